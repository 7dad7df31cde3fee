"""Processing equals HF's: pixels (PIL image processor), token ids and masks (InstructBLIP / BLIP-2
processors), and end-to-end text (HF generate + decode); bad input fails with one clear line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import jblip
from jblip.config import ConfigError
from jblip.image_processing import ImageError, ImageProcessor, load_image
from jblip.processing import Processor, PromptError
from tests.hf_models import NUM_QUERIES
from tests.hf_tokenizers import CORPUS, image_processor, save_checkpoint

MIXED_PROMPTS = ["What colour is the circle?", "hi", "Question: where is the red triangle? Short answer:",
                 "two green circles and one yellow star"]
SEEDS = {"vicuna": 0, "opt": 1, "t5": 1, "t5-blip2": 0}  # seeds whose greedy outputs are not one repeated token


def noise_image(rng, size, mode="RGB"):
    w, h = size
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(colors=13)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    data = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(data, mode)


def test_pixels_equal_hf_pil_processor_exactly():
    rng = np.random.default_rng(0)
    palette_with_transparency = noise_image(rng, (30, 20), "P")
    palette_with_transparency.info["transparency"] = 3
    images = {
        "rgb": noise_image(rng, (64, 48)),
        "rgba": noise_image(rng, (50, 40), "RGBA"),
        "grayscale": noise_image(rng, (33, 45), "L"),
        "gray+alpha": noise_image(rng, (31, 29), "LA"),
        "palette": noise_image(rng, (40, 40), "P"),
        "palette+transparency": palette_with_transparency,
        "odd 37x23": noise_image(rng, (37, 23)),
        "upscaled 9x7": noise_image(rng, (9, 7)),
    }
    for size in (28, 224):
        ref = image_processor()
        ref.size = {"height": size, "width": size}
        ours = ImageProcessor(size)
        for name, image in images.items():
            expected = ref([image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            got = ours([image])[0]
            assert got.dtype == np.float32 and got.shape == (size, size, 3)
            delta = float(np.abs(got.astype(np.float64) - expected).max())
            print(f"{name} -> {size}: max |delta| = {delta}")
            assert delta == 0, name
    # RGBA really is composited on white: dropping alpha (plain convert) would differ
    rgba = images["rgba"]
    dropped = ImageProcessor(28)([rgba.convert("RGB")])
    assert np.abs(dropped - ImageProcessor(28)([rgba])).max() > 0.1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family, legacy=False):
        key = (family, legacy)
        if key not in made:
            path = str(tmp_path_factory.mktemp(family + ("-legacy" if legacy else "")))
            hf, processor = save_checkpoint(path, family, seed=SEEDS[family], legacy=legacy)
            made[key] = (path, hf, processor)
        return made[key]
    return get


def images_for(n, seed=1):
    rng = np.random.default_rng(seed)
    sizes = [(37, 23), (40, 40), (23, 51), (64, 48)]
    modes = ["RGB", "RGBA", "L", "P"]
    return [noise_image(rng, sizes[i % 4], modes[i % 4]) for i in range(n)]


def hf_inputs(processor, images, prompts, **kw):
    out = processor(images=images, text=prompts, padding=True, return_tensors="np", **kw)
    out = {k: np.asarray(v) for k, v in out.items()}
    out["pixel_values"] = out["pixel_values"].transpose(0, 2, 3, 1)
    return out


def assert_same_inputs(ours, ref, keys=None):
    for key in keys or ref:
        assert ours[key].shape == ref[key].shape, (key, ours[key].shape, ref[key].shape)
        if key == "pixel_values":
            assert np.abs(ours[key] - ref[key]).max() == 0
        else:
            assert ours[key].tolist() == ref[key].tolist(), f"{key}:\n{ours[key]}\nvs HF\n{ref[key]}"


@pytest.mark.parametrize("family", ["vicuna", "opt", "t5", "t5-blip2"])
def test_token_ids_and_masks_equal_hf_processor(checkpoints, family):
    path, _, hf_processor = checkpoints(family)
    prompts = MIXED_PROMPTS + ([""] if "blip2" in family or family == "opt" else [])  # BLIP-2 may caption from ""
    images = images_for(len(prompts))
    ours = Processor.from_pretrained(path)(images, prompts)
    ref = hf_inputs(hf_processor, images, prompts)
    assert set(k for k, v in ours.items() if v is not None) == set(ref)
    assert_same_inputs(ours, ref)
    # the layout the model expects: Q placeholders first; LMs padded left, T5 right, Q-Former right
    ids, mask = ours["input_ids"], ours["attention_mask"]
    assert (ids[:, :NUM_QUERIES] == hf_processor.tokenizer.convert_tokens_to_ids("<image>")).all()
    short = 1  # "hi"
    assert mask[short, -1] == (0 if family.startswith("t5") else 1)
    if ours["qformer_attention_mask"] is not None:
        assert ours["qformer_attention_mask"][short, 0] == 1 and ours["qformer_attention_mask"][short, -1] == 0


def test_bos_eos_flags_in_tokenizer_config_are_ignored_like_hf(checkpoints, tmp_path):
    """Older saves state add_bos_token / add_eos_token in tokenizer_config.json; transformers 5.x
    ignores them when tokenizer.json exists (its template decides), and so does jblip."""
    import shutil
    from transformers import AutoTokenizer
    from jblip.text_processing import TextTokenizer
    path, _, _ = checkpoints("vicuna")
    for flags in ({"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False}):
        copy = tmp_path / str(len(flags))
        shutil.copytree(path, copy)
        config = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        ref = AutoTokenizer.from_pretrained(str(copy))(MIXED_PROMPTS)["input_ids"]
        ours = TextTokenizer.from_dir(str(copy)).encode(MIXED_PROMPTS)
        assert ours == ref, flags
        assert ours[0][0] == 2 and ours[0][-1] != 2  # BOS from tokenizer.json's template, no EOS


def save_tokenizer_dir(directory, tokenizer_json: str, config: dict) -> str:
    """A tokenizer folder as the hub holds it: tokenizer.json + tokenizer_config.json."""
    directory.mkdir()
    (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def hub_style_llama_file(directory, legacy: bool):
    """A LLaMA tokenizer.json as the older hub repos (Vicuna's) carry it: sentencepiece-style
    normalizer (prepend "▁", spaces -> "▁"), no pre-tokenizer, byte fallback, BOS `</s>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    spm_like = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = spm_like
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    tok = Tokenizer(models.BPE(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = spm_like
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.add_special_tokens(specials[:3])
    return save_tokenizer_dir(directory, tok.to_str(), dict(
        tokenizer_class="LlamaTokenizer", legacy=legacy, bos_token="</s>", eos_token="</s>", unk_token="</s>"))


@pytest.mark.parametrize("legacy", [False, True])
def test_hub_style_llama_tokenizer_file_tokenizes_like_transformers(tmp_path, legacy):
    """transformers 5 rebuilds LLaMA's pre-tokenizer instead of using an old file's normalizer
    (they differ on text that starts with a space, or follows a special token); jblip follows."""
    from transformers import AutoTokenizer
    from jblip.text_processing import TextTokenizer
    path = hub_style_llama_file(tmp_path / "tok", legacy)
    texts = ["What colour is the circle?", "  two spaces first", "line one\nline two", "café ☃ 日本",
             "a </s>b", " </s>x", ""]
    ref = AutoTokenizer.from_pretrained(path)
    ours = TextTokenizer.from_dir(path)
    assert ours.encode(texts) == ref(texts)["input_ids"]
    assert [ours.decode(ids) for ids in ours.encode(texts)] == [
        ref.decode(ids, skip_special_tokens=True).strip() for ids in ref(texts)["input_ids"]]


def test_training_encodes_with_the_same_tokenizer_as_inference(tmp_path):
    """One tokenizer wrapper: the training data encoder reads a hub-style LLaMA file through the
    same pipeline fix as inference, so its ids (without specials) equal transformers'."""
    from transformers import AutoTokenizer
    from jblip.train.data import Encoder
    from jblip.train.labels import TextLayout
    from jblip.text_processing import TextTokenizer
    path = hub_style_llama_file(tmp_path / "tok", legacy=False)
    ref = AutoTokenizer.from_pretrained(path)
    tok = TextTokenizer.from_dir(os.path.join(path, "tokenizer.json"))  # a file path works too
    encoder = Encoder(TextLayout(family="llama", num_queries=4, image_token=None, bos=1, eos=2, pad=0,
                                    use_qformer_text=False), tok, None)
    for text in ("What colour is the circle?", "  two spaces first", " </s>x"):
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert encoder.instruction({"text_input": text}) == expected, text


def hub_style_t5_file(directory, old_metaspace: bool):
    """A Flan-T5 tokenizer.json as the hub repos carry it: Unigram, a normalizer that collapses
    runs of spaces, WhitespaceSplit + Metaspace (in the pre-0.19 `add_prefix_space` form if
    `old_metaspace`), `$A </s>`. (The hub files also hold a sentencepiece charsmap, which both
    libraries apply as it is.)"""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(**metaspace)])
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>", show_progress=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    saved = json.loads(tok.to_str())
    if old_metaspace:
        old = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
        saved["pre_tokenizer"]["pretokenizers"][1] = saved["decoder"] = old
    return save_tokenizer_dir(directory, json.dumps(saved), dict(
        tokenizer_class="T5Tokenizer", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0))


def hub_style_opt_file(directory, bos_template: bool, add_bos_token):
    """An OPT tokenizer.json: byte-level BPE whose post-processor prepends `</s>` (as converted
    from GPT2Tokenizer with add_bos_token) or is plain ByteLevel; `add_bos_token` in the config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = (processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
                          if bos_template else processors.ByteLevel(trim_offsets=False))
    config = dict(tokenizer_class="GPT2Tokenizer", bos_token="</s>", eos_token="</s>", unk_token="</s>",
                  pad_token="<pad>", add_prefix_space=False)
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    return save_tokenizer_dir(directory, tok.to_str(), config)


HUB_TEXTS = ["What colour is the circle?", "  two  spaces", "line one\nline two\ttab", "café ☃ 日本", "a </s>b",
             " </s>x", ""]


@pytest.mark.parametrize("variant", ["t5", "t5-old-metaspace", "opt-bos", "opt-bos-flag-off", "opt-bytelevel",
                                     "opt-bytelevel-flag-on"])
def test_hub_style_t5_and_opt_tokenizer_files_tokenize_like_transformers(tmp_path, variant):
    """transformers 5 rebuilds T5's and GPT-2's pipelines around an old file's vocabulary (T5: no
    space-collapsing normalizer; GPT-2: byte-level, the file's post-processor, `add_bos_token`
    ignored); jblip, which reads the file as it is, gives the same ids."""
    from transformers import AutoTokenizer
    from jblip.text_processing import TextTokenizer
    if variant.startswith("t5"):
        path = hub_style_t5_file(tmp_path / "tok", old_metaspace=variant.endswith("old-metaspace"))
    else:
        flag = {"opt-bos": True, "opt-bos-flag-off": False, "opt-bytelevel": None, "opt-bytelevel-flag-on": True}
        path = hub_style_opt_file(tmp_path / "tok", "bos" in variant, flag[variant])
    ref = AutoTokenizer.from_pretrained(path)(HUB_TEXTS)["input_ids"]
    assert TextTokenizer.from_dir(path).encode(HUB_TEXTS) == ref
    assert (ref[0][0] == 2) == ("bos" in variant)  # only the file's template adds BOS


def test_decoding_options():
    from jblip.pipeline import sampler_for
    from jblip.sampling import SamplerConfig

    class Stub:
        def default_sampler(self):
            return SamplerConfig(eos_token_ids=(2,), pad_token_id=0)
    model = Stub()
    assert sampler_for(model) == SamplerConfig(eos_token_ids=(2,), pad_token_id=0)
    lavis = sampler_for(model, "instructblip")
    assert (lavis.strategy, lavis.num_beams, lavis.repetition_penalty, lavis.eos_token_ids) == ("beam", 5, 1.5, (2,))
    assert sampler_for(model, num_beams=3).strategy == "beam"
    sampled = sampler_for(model, "instructblip", do_sample=True, top_p=0.8)
    assert (sampled.strategy, sampled.num_beams, sampled.top_p) == ("sample", 1, 0.8)
    assert sampler_for(model, eos_token_ids=7).eos_token_ids == (7,)
    with pytest.raises(ValueError, match="unknown decoding option"):
        sampler_for(model, beams=3)
    with pytest.raises(ValueError, match="unknown decoding preset"):
        sampler_for(model, "fast")


def test_long_instruction_is_cut_from_the_left_like_hf(checkpoints):
    path, _, hf_processor = checkpoints("vicuna")
    long = " ".join(CORPUS[:6])
    images, prompts, limit = images_for(2), [long, "hi"], 12
    ours = Processor.from_pretrained(path)(images, prompts, max_length=limit)
    # HF counts the placeholders in max_length for the LM, not for the Q-Former
    ref_lm = hf_inputs(hf_processor, images, prompts, truncation=True, max_length=limit + NUM_QUERIES)
    ref_q = hf_inputs(hf_processor, images, prompts, truncation=True, max_length=limit)
    assert_same_inputs(ours, ref_lm, ["input_ids", "attention_mask"])
    assert_same_inputs(ours, ref_q, ["qformer_input_ids", "qformer_attention_mask"])
    row = ours["input_ids"][0, NUM_QUERIES:]
    tok = hf_processor.tokenizer
    assert len(row) == limit and row[0] == 2  # BOS kept, the start of the text dropped
    assert tok.decode(row, skip_special_tokens=True).endswith(long.split()[-1])


def test_legacy_layout_has_no_placeholders(checkpoints):
    path, _, hf_processor = checkpoints("vicuna", legacy=True)
    ours = Processor.from_pretrained(path)(images_for(3), MIXED_PROMPTS[:3])
    ref = hf_processor.tokenizer(MIXED_PROMPTS[:3], padding=True, return_tensors="np")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()


@pytest.mark.parametrize("family", ["vicuna", "opt", "t5"])
def test_text_equals_hf_generate_and_decode(checkpoints, family):
    path, hf, hf_processor = checkpoints(family)
    images, prompts, new = images_for(3, seed=2), MIXED_PROMPTS[:3], 8
    inputs = {k: torch.tensor(v) for k, v in hf_processor(images=images, text=prompts, padding=True,
                                                          return_tensors="np").items()}
    skip = 1 if family == "t5" else inputs["input_ids"].shape[1]

    def hf_generate(eos):
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                              pad_token_id=hf_processor.tokenizer.pad_token_id)
        return out[:, skip:].numpy()
    first = hf_generate(eos=hf_processor.tokenizer.pad_token_id)[0]
    eos = int(next((t for t in first[2:] if t != first[0]), first[2]))  # a token it emits: stopping is exercised
    tokens = hf_generate(eos)
    assert (tokens == eos).any()
    expected = [t.strip() for t in hf_processor.batch_decode(tokens, skip_special_tokens=True)]

    model = jblip.load_pretrained(path)
    got = model.generate_text(images, prompts, max_new_tokens=new, eos_token_ids=eos)
    print(family, "eos", eos, got)
    assert got == expected
    assert any(got)


# ---------------------------------------------------------------------------- errors

def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image(tmp_path / "nope.png")
    one_line(e, "nope.png", "not found")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError) as e:
        ImageProcessor(28)([str(text)])
    one_line(e, "notes.png", "cannot read image")
    truncated = tmp_path / "cut.png"
    noise_image(np.random.default_rng(0), (40, 40)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ImageError) as e:
        load_image(truncated)
    one_line(e, "cut.png")


def test_prompt_errors(checkpoints):
    path, _, _ = checkpoints("vicuna")
    processor = Processor.from_pretrained(path)
    with pytest.raises(PromptError) as e:
        processor.text_inputs(["What colour is it?", "  "])
    one_line(e, "prompt 1 is empty", "InstructBLIP")
    long = " ".join(CORPUS[:6])
    with pytest.raises(PromptError) as e:
        processor.text_inputs(["hi", long], max_length=16, truncation=False)
    one_line(e, "prompt 1", "more than the 16")
    with pytest.raises(PromptError) as e:  # the model itself: 128 positions - 6 queries
        processor.text_inputs([long * 4], max_length=None, truncation=False)
    one_line(e, "prompt 0", "more than the 122 the model allows")
    with pytest.raises(PromptError) as e:
        processor(images_for(2), ["a", "b", "c"])
    one_line(e, "3 prompts for 2 images")


def test_checkpoint_errors(checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        jblip.load_pretrained(str(empty))
    one_line(e, "no config.json")
    with pytest.raises(ConfigError) as e:
        Processor.from_pretrained(str(empty))
    one_line(e, "no config.json")

    path, _, _ = checkpoints("vicuna")
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    other = tmp_path / "llava"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ConfigError) as e:
        Processor.from_pretrained(str(other))
    one_line(e, "unknown model family", "llava")
    text_family = tmp_path / "neox"
    text_family.mkdir()
    bad_text = {**config["text_config"], "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (text_family / "config.json").write_text(json.dumps({**config, "text_config": bad_text}))
    with pytest.raises(ConfigError) as e:
        jblip.load_pretrained(str(text_family))
    one_line(e, "unknown language-model family", "gpt_neox")

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError) as e:
        Processor.from_pretrained(str(no_tokenizer))
    one_line(e, "no tokenizer.json")
