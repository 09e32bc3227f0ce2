"""Images (and other tensors) as a corpus: dissection datasets read from folders, spatial positions as rows."""
