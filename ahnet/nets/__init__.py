"""Networks: the 2D ResNet encoders, the 2D MC-GCN, the 3D AH-Net and the 3D U-Net baseline."""
