"""Synthetic DICOM data sets for the benchmark and the tests.

Made with pydicom so that nothing is downloaded: CT images of a chosen pixel
size, tiny secondary-capture-like objects, large multi-frame objects.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def make_dataset(
    sop_class: str = CTImageStorage,
    rows: int = 0,
    columns: int = 0,
    frames: int = 1,
    series_date: str | None = "20240131",
    instance_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A small but valid object; pixel data of rows*columns*frames 16-bit words."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid or generate_uid()
    ds.StudyDate = "20240131"
    if series_date is not None:
        ds.SeriesDate = series_date
    ds.Modality = "CT"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = seed
    if rows and columns:
        ds.Rows = rows
        ds.Columns = columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        size = rows * columns * 2 * frames
        block = os.urandom(min(size, 1 << 20))
        ds.PixelData = (block * (size // len(block) + 1))[:size]
    return ds


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Save as a Part 10 file in ``transfer_syntax`` (uncompressed ones only)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def generate(kind: str, count: int, directory: Path) -> list[Path]:
    """``ct`` (0.5 MB), ``small`` (~3 KB) or ``large`` (~100 MB multi-frame)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        if kind == "ct":
            ds = make_dataset(rows=512, columns=512, seed=i)
        elif kind == "small":
            ds = make_dataset(BASIC_TEXT_SR, seed=i)
            ds.ImageComments = "x" * 2800
        elif kind == "large":
            ds = make_dataset(ENHANCED_CT, rows=512, columns=512, frames=200, seed=i)
        else:
            raise ValueError(kind)
        paths.append(write(ds, directory / f"{kind}{i:05d}.dcm"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("ct", "small", "large"))
    parser.add_argument("count", type=int)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    generate(args.kind, args.count, args.directory)


if __name__ == "__main__":
    main()
