"""Inside the language model: layouts, hook points, splicing, precision, compression and its verification,
activation collection."""
