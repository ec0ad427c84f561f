"""How vosk's JSON becomes a SpeechResult (the confidence rule), without a model."""

from __future__ import annotations

import json

import pytest

from voice.media.asr import SpeechResult, _speech_result


@pytest.mark.parametrize(
    ("vosk", "expected"),
    [
        ({"text": ""}, SpeechResult("", 0.0)),
        ({"result": [{"word": "예", "conf": 0.82}], "text": "예"}, SpeechResult("예", 0.82)),
        # the least sure word decides
        (
            {"result": [{"word": "no", "conf": 0.9}, {"word": "thanks", "conf": 0.4}]},
            SpeechResult("no thanks", 0.4),
        ),
        # out-of-grammar speech is not an answer
        ({"result": [{"word": "[unk]", "conf": 1.0}], "text": "[unk]"}, SpeechResult("", 0.0)),
        (
            {"result": [{"word": "[unk]", "conf": 0.3}, {"word": "yes", "conf": 0.7}]},
            SpeechResult("yes", 0.7, unknown_words=1),
        ),
    ],
)
def test_speech_result(vosk: dict[str, object], expected: SpeechResult) -> None:
    assert _speech_result(json.dumps(vosk, ensure_ascii=False)) == expected
