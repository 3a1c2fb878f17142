"""AH-Net: 3D Anisotropic Hybrid Network for lung nodules in thick-slice chest CT.

Conventions: tensors are (N, C, D, H, W) with D the slice axis; arrays are (z, y, x); spacing is
(sz, sy, sx) in mm; world coordinates are LPS millimetres (the LUNA16 / SimpleITK convention).
"""
__version__ = "0.1.0"
