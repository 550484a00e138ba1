"""Data: webdataset-format shards and the datasets built on them."""
