"""Server pieces that need no model: incremental text with stop strings, OpenAI options ->
decoding settings, image URL checks."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from jblip.sampling import SamplerConfig  # noqa: E402
from jblip.serve.errors import APIError  # noqa: E402
from jblip.serve.images import ImageLimits, read_image_url  # noqa: E402
from jblip.serve.options import decoding_for  # noqa: E402
from jblip.serve.protocol import ChatCompletionRequest  # noqa: E402
from jblip.serve.text_stream import TextStream  # noqa: E402


class Pieces:
    """A tokenizer whose ids index a list of text pieces (decode = join, stripped)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).strip()


def run(pieces, stop=(), chunks=None):
    stream = TextStream(Pieces(pieces), tuple(stop))
    deltas = [stream.add([i]) for i in range(len(pieces))] if chunks is None else [stream.add(c) for c in chunks]
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_concatenate_to_the_decoded_text():
    deltas, stream = run([" the", " cat", " sat", " "])
    assert "".join(deltas) == stream.text == "the cat sat"
    assert deltas[:3] == ["the", " cat", " sat"]


def test_stop_string_ends_the_answer_before_it_and_is_never_sent():
    deltas, stream = run([" one", " two", " thr", "ee", " four"], stop=("three",))
    assert stream.stopped and stream.text == "one two "  # as OpenAI: everything before the stop string
    assert "".join(deltas) == "one two "
    assert deltas[2] == " "  # "thr" could begin "three": held back


def test_held_back_text_is_released_when_the_stop_string_does_not_follow():
    deltas, stream = run([" a", " th", "ing"], stop=("three",))
    assert not stream.stopped and "".join(deltas) == "a thing"


def test_incomplete_utf8_is_held_back():
    deltas, _ = run(["ab", "\ufffd", "c"])
    assert deltas[:2] == ["ab", ""] and "".join(deltas) == "ab\ufffdc"


def decoding(**fields):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)
    return decoding_for(body, SamplerConfig(eos_token_ids=(2,)), 16)


def test_openai_options_map_to_decoding_settings():
    greedy = decoding()
    assert greedy.sampler.strategy == "greedy" and greedy.sampler.max_new_tokens == 16 and not greedy.seeded
    sample = decoding(temperature=0.7, top_p=0.9, n=3, seed=5, stop="\n", top_k=20)
    s = sample.sampler
    assert (s.strategy, s.temperature, s.top_p, s.top_k, s.num_return_sequences) == ("sample", 0.7, 0.9, 20, 3)
    assert sample.seed == 5 and sample.seeded and sample.stop == ("\n",)
    beam = decoding(num_beams=4, n=2, length_penalty=0.5, repetition_penalty=1.3, min_tokens=2)
    b = beam.sampler
    assert (b.strategy, b.num_beams, b.num_return_sequences, b.length_penalty, b.repetition_penalty,
            b.min_new_tokens) == ("beam", 4, 2, 0.5, 1.3, 2)
    assert decoding(temperature=0).sampler.strategy == "greedy"


@pytest.mark.parametrize("fields,param", [
    (dict(n=2), "n"), (dict(temperature=1.0, num_beams=2), "num_beams"), (dict(min_tokens=17), "min_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(presence_penalty=0.5), "presence_penalty"),
])
def test_options_jblip_cannot_honour_are_refused(fields, param):
    with pytest.raises(APIError) as e:
        decoding(**fields)
    assert e.value.status == 400 and e.value.param == param


def test_image_urls(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (255, 0, 0)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert read_image_url(url, ImageLimits()).size == (5, 4)
    with pytest.raises(APIError, match="byte limit"):
        read_image_url(url, ImageLimits(max_bytes=10))
    with pytest.raises(APIError, match="pixels"):
        read_image_url(url, ImageLimits(max_pixels=19))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(buffer.getvalue())
    (tmp_path / "b.png").write_bytes(buffer.getvalue())
    allowed = ImageLimits(allow_local_files=str(tmp_path / "in"))
    assert read_image_url("a.png", allowed).size == (5, 4)
    assert read_image_url(f"file://{tmp_path}/in/a.png", allowed).size == (5, 4)
    for outside in ("../b.png", str(tmp_path / "b.png"), f"file://{tmp_path}/b.png"):
        with pytest.raises(APIError) as e:
            read_image_url(outside, allowed)
        assert e.value.status == 403
    with pytest.raises(APIError, match="--allow-local-files"):
        read_image_url("a.png", ImageLimits())
    for remote in ("http://x/a.png", "https://x/a.png", "ftp://x/a.png", "s3://bucket/a.png"):
        with pytest.raises(APIError, match="remote"):
            read_image_url(remote, allowed)
