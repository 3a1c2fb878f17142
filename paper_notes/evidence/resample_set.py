"""Diagnostic of results.md part Q: a rendered phantom set resampled in-plane to another pixel spacing over the
same field of view (image linear, label nearest, SimpleITK; the origin moved so the field's edges stay put; the
annotations, in world mm, copied unchanged), so a model can be evaluated at the pixel spacing it was trained on.

    python paper_notes/evidence/resample_set.py data/phantom-cpu-main-dev-inplane0.9 \
        data/phantom-cpu-main-dev-inplane0.9-to0.7 0.7

Not part of the package: the inference-time resampling it stands in for is still to be built (results.md)."""
import json, shutil, sys
from pathlib import Path
import SimpleITK as sitk

src, dst, sp = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
d = json.load(open(src / "dataset.json"))
(dst / "imagesTr").mkdir(parents=True, exist_ok=True); (dst / "labelsTr").mkdir(exist_ok=True)
for e in d["training"]:
    for key, interp in (("image", sitk.sitkLinear), ("label", sitk.sitkNearestNeighbor)):
        im = sitk.ReadImage(str(src / e[key]))
        old = im.GetSpacing(); size = im.GetSize()
        new_size = [int(round(size[i] * old[i] / sp)) if i < 2 else size[i] for i in range(3)]
        new_sp = [sp, sp, old[2]]
        d0 = im.GetDirection()
        org = list(im.GetOrigin())
        for i in range(2):       # identity direction (checked): keep the field's edge
            assert abs(d0[i * 3 + i] - 1) < 1e-9
            org[i] = org[i] - old[i] / 2 + sp / 2
        out = sitk.Resample(im, new_size, sitk.Transform(), interp, org, new_sp, d0, -1024.0 if key == "image" else 0,
                            im.GetPixelID())
        sitk.WriteImage(out, str(dst / e[key]))
d["options"] = dict(d["options"], spacing=sp, size=new_size[0], resampled_from=old[0])
json.dump(d, open(dst / "dataset.json", "w"), indent=1)
shutil.copy(src / "annotations.csv", dst / "annotations.csv")
print(dst, new_size, new_sp)
