"""2D -> 3D weight transfer: `python -m weights_transfer` (behind `bash run.sh transfer`)."""
