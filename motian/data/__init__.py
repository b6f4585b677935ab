"""Data: built-in corpora and user files, cleaning, vocabulary, encoding, loading, masking."""
