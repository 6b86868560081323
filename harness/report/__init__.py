"""What people read: markdown tables, figures, the HTML site and the feature browser."""
