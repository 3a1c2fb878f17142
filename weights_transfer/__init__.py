"""`python -m weights_transfer` (behind `bash run.sh transfer`): the command that runs the 2D -> 3D transfer of
ahnet.nets.transfer on a checkpoint and prints its exactness table."""
