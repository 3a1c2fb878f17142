"""The tests' small DICOM CT series, written the way a scanner writes one: a file per slice with its own
SOPInstanceUID, the study, series and frame-of-reference UIDs, patient and study identity, position and
orientation per slice. File names run against the slice order, so a reader that keeps the files' order instead of
the positions' gets the slices wrong. Written with SimpleITK (no pydicom needed)."""
import numpy as np

from ahnet.data.io import kept_locale

ROOT_UID = "1.2.826.0.1.3680043.2.1125.7"          # short: UIDs below stay well under DICOM's 64 characters


def series_uids(tag: int) -> dict:
    """The study, series and frame-of-reference UIDs of test series number ``tag``."""
    return {"study": f"{ROOT_UID}.{tag}.1", "series": f"{ROOT_UID}.{tag}.2", "frame": f"{ROOT_UID}.{tag}.3"}


def write_ct_series(folder, hu_zyx, spacing, origin, direction, tag: int = 1, frame_of_reference: bool = True):
    """Write (z, y, x) HU as an int16 CT series into ``folder`` (created); spacing (sz, sy, sx) mm, origin (x, y, z)
    LPS mm, direction 3x3 (columns: index axes x, y, z). Returns {"study", "series", "frame", "sop": [UID of
    slice k, k = array z index]}; ``frame_of_reference=False`` leaves FrameOfReferenceUID out."""
    with kept_locale():                                  # GDCM's writer switches the process locale
        return _write(folder, hu_zyx, spacing, origin, direction, tag, frame_of_reference)


def _write(folder, hu_zyx, spacing, origin, direction, tag, frame_of_reference):
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.rint(hu_zyx).astype(np.int16))
    img.SetSpacing([float(s) for s in spacing[::-1]])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(np.asarray(direction, float).reshape(-1).tolist())
    uids = series_uids(tag)
    uids["sop"] = [f"{uids['series']}.{k + 1}" for k in range(img.GetDepth())]
    d = np.asarray(direction, float)
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = img.GetDepth()
    for k in range(n):
        s = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = [("0008|0060", "CT"), ("0020|000d", uids["study"]), ("0020|000e", uids["series"]),
                ("0020|0037", iop), ("0020|0032", "\\".join(f"{v:.6f}" for v in pos)), ("0020|0013", str(k + 1)),
                ("0018|0050", str(spacing[0])), ("0008|0018", uids["sop"][k]), ("0010|0010", "Phantom^Test"),
                ("0010|0020", f"P{tag}"), ("0020|0010", f"S{tag}"), ("0020|0011", "3"),
                ("0008|0050", f"A{tag}"), ("0008|0090", "")]
        if frame_of_reference:
            tags.append(("0020|0052", uids["frame"]))
        for key, value in tags:
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"im{n - k:04d}.dcm"))    # names against the slice order
        writer.Execute(s)
    return uids
