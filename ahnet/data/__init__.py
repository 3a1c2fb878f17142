"""Data: readers and writers, the phantom, LIDC annotations, the 12-type rule, cache and sampling."""
