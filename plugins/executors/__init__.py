"""Built-in executors: how a matrix's pending cells are computed (``local``, ``ray``)."""
