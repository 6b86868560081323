"""Text in: the corpus packed into token splits, the embedded assets, tokenizer rebuilds."""
