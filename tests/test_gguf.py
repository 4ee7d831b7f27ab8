"""GGUF export: llama.cpp's converters and quantiser, the file checked by llama.cpp against transformers, the Ollama
Modelfile's Go template against the chat template, and one-line errors for what cannot be exported."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY_MODEL

from bench import gguf_parity, llama_cpp_build
from lora_recipes import gguf
from lora_recipes.errors import RecipeError
from lora_recipes.inference import (
    conversation,
    conversation_logits,
    from_pretrained,
    load_tokenizer,
    plain_chat_template,
    read_json,
)
from lora_recipes.llama_cpp_convert import gpt2_split
from lora_recipes.templates import end_of_turn_token_id, training_chat_template
from lora_recipes.tiny_model import FAMILIES
from recipes import export_gguf, merge
from recipes.merge import CHECK_PROMPTS

# The export checks its file with llama.cpp itself: without the compiled bindings (requirements-gguf.txt, which CI
# installs) those tests skip; the converters, the Modelfile's Go template and the errors are tested either way
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed: pip install -r requirements-gguf.txt")
SYSTEM_PROMPT_CHATS = 3  # len(CHECK_PROMPTS), each with the run's system prompt


def export(*args: str) -> subprocess.CompletedProcess:
    """`python recipes/export_gguf.py ...`, as a user runs it."""
    return subprocess.run([sys.executable, "recipes/export_gguf.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="session")
def converters():
    return gguf.converter_dir()


@pytest.fixture(scope="session")
def merged_tiny(medical_smoke_run, tmp_path_factory):
    """The smoke adapter merged by recipes/merge.py: what the GGUF must reproduce."""
    adapter_dir, _ = medical_smoke_run
    output_dir = tmp_path_factory.mktemp("merged")
    merge.run(["--adapter", str(adapter_dir), "--output_dir", str(output_dir)])
    return output_dir


@pytest.fixture(scope="session")
def q8_export(medical_smoke_run, tmp_path_factory):
    """The issue's command: --quantization q8_0, merging on its own."""
    adapter_dir, _ = medical_smoke_run
    output_dir = tmp_path_factory.mktemp("gguf-q8_0")
    proc = export("--adapter", str(adapter_dir), "--output_dir", str(output_dir), "--quantization", "q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, proc


@pytest.fixture(scope="session")
def f16_export(medical_smoke_run, merged_tiny, tmp_path_factory):
    """f16 with the GGUF LoRA and its base, from the merge of `merged_tiny` (--merged)."""
    adapter_dir, _ = medical_smoke_run
    output_dir = tmp_path_factory.mktemp("gguf-f16")
    proc = export("--adapter", str(adapter_dir), "--output_dir", str(output_dir), "--quantization", "f16",
                  "--lora_adapter", "--merged", str(merged_tiny))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, proc


def reference(merged_dir):
    """The merged transformers model on the merge check prompts: (tokenizer, chats, prompt ids, logits)."""
    tokenizer = load_tokenizer(merged_dir)
    chats = [conversation(p, read_json(merged_dir / "run_card.json")["system_prompt"]) for p in CHECK_PROMPTS]
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for c in chats]
    model = from_pretrained(str(merged_dir), dtype="auto")
    return tokenizer, chats, ids, conversation_logits(model, tokenizer, chats), model


# The converters --------------------------------------------------------------------------------------------------


def test_converters_come_from_the_pinned_sdist(converters):
    assert (converters / "convert_hf_to_gguf.py").is_file() and (converters / "gguf-py" / "gguf").is_dir()
    assert llama_cpp_build.requirement_line().split()[0] == gguf.LLAMA_CPP_PYTHON
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= gguf.supported_architectures(converters)


def test_gpt2_pre_tokenizer_only_for_a_gpt2_split(tmp_path):
    """The tiny model's byte-level tokenizer is not in llama.cpp's hash list; only an exact GPT-2 split maps to
    llama.cpp's 'gpt-2' pre-tokenizer."""
    assert gpt2_split(TINY_MODEL)
    tokenizer = json.loads((TINY_MODEL / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert not gpt2_split(tmp_path)


@pytest.fixture(scope="session")
def converted_tiny(converters, merged_tiny, tmp_path_factory):
    """The merged smoke model converted by llama.cpp's converter alone (no llama.cpp runtime needed)."""
    path = tmp_path_factory.mktemp("converted") / "model-f16.gguf"
    gguf.convert_model(converters, merged_tiny, path)
    return path


def test_f16_gguf_read_back_by_transformers(converted_tiny, merged_tiny):
    """A check that needs no llama.cpp: transformers reads the GGUF back (gguf_file=) with the same prompt tokens
    from the GGUF's own tokenizer and chat template, and logits within the f16 tolerance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, chats, ids, logits, _ = reference(merged_tiny)
    back = AutoModelForCausalLM.from_pretrained(converted_tiny.parent, gguf_file=converted_tiny.name)
    back_tokenizer = AutoTokenizer.from_pretrained(converted_tiny.parent, gguf_file=converted_tiny.name)
    differences = []
    for chat, chat_ids, chat_logits in zip(chats, ids, logits, strict=True):
        assert back_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"] == chat_ids
        with torch.no_grad():
            differences.append((back(torch.tensor([chat_ids])).logits - chat_logits).abs().max().item())
    print(f"transformers reading the f16 GGUF: max |logit difference| {max(differences):.4g}")
    assert max(differences) <= export_gguf.BOUNDS["f16"]["max_logit_difference"]


# The verdict on a file: decisive positions and near ties ------------------------------------------------------------

NEAR = export_gguf.TIE_MARGIN / 5  # a lead well inside a near tie
REFERENCE = torch.tensor([[5.0, 1.0, 0.0, 0.0],  # decisive: token 0 leads by 4
                          [2.0, 2.0 - NEAR, 0.0, 0.0],  # near tie between tokens 0 and 1
                          [0.0, 3.0, 1.0, 0.0]])  # decisive: token 1 leads by 2


def test_top1_flip_at_a_near_tie_reported_not_refused():
    """f16 arithmetic may swap transformers' top two where they are nearly tied: counted apart, the file accepted;
    raw top-1 agreement still reported (and still bounds q8_0)."""
    candidate = REFERENCE.clone()
    candidate[1, :2] = torch.tensor([2.0 - NEAR / 2, 2.0 - NEAR / 4])  # token 1 now on top, each logit moved < NEAR
    result = gguf.compare_logits([REFERENCE], [candidate], export_gguf.TIE_MARGIN)
    assert result["top1_agreement"] == pytest.approx(2 / 3)
    assert (result["decisive_positions"], result["decisive_top1_agreement"]) == (2, 1.0)
    assert (result["near_ties"], result["near_tie_flips"]) == (1, 1)
    assert result["max_logit_difference"] == pytest.approx(3 * NEAR / 4)
    assert export_gguf.failures(result, "f16") == []
    assert export_gguf.failures(result, "q8_0") == ["top-1 agreement 0.667 < 0.9"]
    assert "(1.0000 at 2 decisive positions; 1 near ties" in export_gguf.summary(result)


def test_top1_flip_at_a_decisive_position_refused():
    candidate = REFERENCE.clone()
    candidate[2, 2] = 3.5  # token 2 over transformers' token 1, which led by 2
    result = gguf.compare_logits([REFERENCE], [candidate], export_gguf.TIE_MARGIN)
    assert (result["decisive_top1_agreement"], result["near_tie_flips"]) == (0.5, 0)
    failed = export_gguf.failures(result, "f16")
    assert len(failed) == 2 and failed[0].startswith("max |logit difference| 2.5 > 0.25")
    assert failed[1].startswith("top-1 agreement 0.5000 at the 2 decisive positions")


EXPECTED = [10, 11, 12, 13, 14]  # transformers' greedy answer, and how far each token led the second
LEADS = [3.0, 2.0, NEAR, 4.0, NEAR]


@pytest.mark.parametrize(("answer", "identical", "diverged_at", "accepted"), [
    ([10, 11, 12, 13, 14], True, None, True),
    ([10, 11, 99, 98], False, 2, True),  # parts at the near tie
    ([10, 99, 12, 13, 14], False, 1, False),  # before the first near tie
    ([10, 11, 12, 99, 14], False, 3, False),  # after a near tie both took, at a decisive token
    ([10, 11, 12, 13, 14, 15], False, 5, False),  # goes on where transformers ended its answer
])
def test_greedy_may_part_only_at_a_near_tie(answer, identical, diverged_at, accepted):
    greedy = gguf.compare_greedy(EXPECTED, LEADS, answer, export_gguf.TIE_MARGIN)
    assert (greedy["identical"], greedy["diverged_at"], greedy["accepted"]) == (identical, diverged_at, accepted)
    assert greedy["first_near_tie"] == 2 and greedy["tokens"] == len(EXPECTED)
    assert greedy["margin"] == (LEADS[diverged_at] if diverged_at is not None and diverged_at < len(LEADS) else None)


def test_greedy_parting_reported_or_refused():
    """The export's verdict and printed line: parting at a near tie is reported with its token and lead; parting at
    a decisive token refuses the file."""
    result = {**gguf.compare_logits([REFERENCE], [REFERENCE], export_gguf.TIE_MARGIN), "greedy_prompts": 2}
    result["greedy"] = [gguf.compare_greedy(EXPECTED, LEADS, a, export_gguf.TIE_MARGIN)
                        for a in (EXPECTED, [10, 11, 99])]
    result["greedy_identical"] = 1
    assert export_gguf.failures(result, "f16") == []
    assert export_gguf.summary(result).endswith(f"greedy identical 1/2 (parted at a near tie: answer 2 at token 2 "
                                                f"(lead {NEAR:.3g}))")
    result["greedy"][0] = gguf.compare_greedy(EXPECTED, LEADS, [10, 99], export_gguf.TIE_MARGIN)
    assert export_gguf.failures(result, "f16") == [
        f"greedy answer 1 parts from transformers' at token 1, not at a near tie (transformers' lead 2 > "
        f"{export_gguf.TIE_MARGIN:.3g})"]


# llama.cpp against transformers ------------------------------------------------------------------------------------


@needs_llama_cpp
def test_f16_gguf_matches_merged_model(f16_export, merged_tiny):
    """llama.cpp on the f16 GGUF: the prompt it builds from the GGUF's template is transformers' prompt, the logits
    agree within the stated tolerance, the top token wherever transformers' is decisive, and the greedy answers up
    to a near tie; the export recorded the same."""
    output_dir, proc = f16_export
    tokenizer, chats, ids, logits, model = reference(merged_tiny)
    with gguf.GGUFModel(output_dir / "model-f16.gguf") as llm:
        assert [llm.chat_prompt_ids(c) for c in chats] == ids
        result = gguf.compare_logits(logits, [llm.logits(i) for i in ids], export_gguf.TIE_MARGIN)
        answers = [llm.greedy(i, export_gguf.GREEDY_TOKENS) for i in ids]
    assert result["max_logit_difference"] <= export_gguf.BOUNDS["f16"]["max_logit_difference"]
    assert result["decisive_top1_agreement"] == 1.0 and result["decisive_positions"] > 0
    assert result["top1_agreement"] == 1 - result["near_tie_flips"] / result["positions"]
    record = read_json(output_dir / "gguf_check.json")
    check = record["checks"][0]
    assert record["tie_margin"] == export_gguf.TIE_MARGIN
    assert check["max_logit_difference"] == pytest.approx(result["max_logit_difference"], abs=1e-4)
    assert (check["decisive_positions"], check["near_tie_flips"]) == (result["decisive_positions"],
                                                                      result["near_tie_flips"])
    for chat_ids, answer, recorded in zip(ids, answers, check["greedy"], strict=True):
        expected, leads = gguf.transformers_greedy(model, tokenizer, chat_ids, export_gguf.GREEDY_TOKENS,
                                                   model.generation_config.eos_token_id)
        greedy = gguf.compare_greedy(expected, leads, answer, export_gguf.TIE_MARGIN)
        assert greedy["accepted"] and greedy == recorded
        assert answer[:greedy["diverged_at"]] == expected[:greedy["diverged_at"]]
    assert check["greedy_identical"] == sum(g["identical"] for g in check["greedy"]) and \
        check["greedy_prompts"] == SYSTEM_PROMPT_CHATS
    print(f"f16: {result}; greedy: {check['greedy']}")


@needs_llama_cpp
def test_generation_stops_at_the_end_of_turn_token(f16_export, merged_tiny):
    """llama.cpp ends generation at the chat template's end-of-turn token and at no ordinary token: a chat completion
    whose first token is pushed to the end-of-turn token stops there, with nothing said."""
    output_dir, _ = f16_export
    tokenizer = load_tokenizer(merged_tiny)
    end_of_turn = end_of_turn_token_id(tokenizer)
    with gguf.GGUFModel(output_dir / "model-f16.gguf") as llm:
        assert llm.is_end_of_generation(end_of_turn)
        assert not any(llm.is_end_of_generation(t) for t in tokenizer.encode("Start with the basics."))
        completion = llm.llm.create_chat_completion(
            conversation(CHECK_PROMPTS[0], None), temperature=0.0, max_tokens=8, logit_bias={end_of_turn: 100.0})
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 0 and completion["choices"][0]["message"]["content"] == ""


@needs_llama_cpp
def test_quantized_gguf_reported_and_bounded(q8_export, f16_export, merged_tiny, tmp_path):
    """q8_0 (the issue's command): top-1 agreement and mean KL within the bounds; q4_k_m from the same f16 file by
    llama.cpp's quantiser: reported."""
    output_dir, proc = q8_export
    assert (output_dir / "model-q8_0.gguf").is_file() and not (output_dir / "model-f16.gguf").exists()
    _, _, ids, logits, _ = reference(merged_tiny)
    q4 = tmp_path / "model-q4_k_m.gguf"
    gguf.quantize(f16_export[0] / "model-f16.gguf", q4, "q4_k_m")
    results = {}
    for quantization, path in (("q8_0", output_dir / "model-q8_0.gguf"), ("q4_k_m", q4)):
        with gguf.GGUFModel(path) as llm:
            results[quantization] = gguf.compare_logits(logits, [llm.logits(i) for i in ids], export_gguf.TIE_MARGIN)
        print(f"{quantization}: {results[quantization]}")
    bounds = export_gguf.BOUNDS["q8_0"]
    assert results["q8_0"]["top1_agreement"] >= bounds["min_top1_agreement"]
    assert results["q8_0"]["mean_kl"] <= bounds["max_mean_kl"]
    assert results["q8_0"]["mean_kl"] < results["q4_k_m"]["mean_kl"]  # more bits, closer to the merged model
    assert q4.stat().st_size < (output_dir / "model-q8_0.gguf").stat().st_size
    check = read_json(output_dir / "gguf_check.json")["checks"][0]
    assert check["mean_kl"] == pytest.approx(results["q8_0"]["mean_kl"], rel=1e-3)


@needs_llama_cpp
def test_lora_gguf_on_base_gives_merged_model(f16_export, merged_tiny):
    """The adapter alone (GGUF LoRA) on the base GGUF computes the merged model; the base alone does not."""
    output_dir, _ = f16_export
    _, _, ids, logits, _ = reference(merged_tiny)
    with gguf.GGUFModel(output_dir / "base-f16.gguf", lora=output_dir / "adapter-f16.gguf") as llm:
        with_lora = gguf.compare_logits(logits, [llm.logits(i) for i in ids], export_gguf.TIE_MARGIN)
    with gguf.GGUFModel(output_dir / "base-f16.gguf") as llm:
        base_only = gguf.compare_logits(logits, [llm.logits(i) for i in ids], export_gguf.TIE_MARGIN)
    assert with_lora["max_logit_difference"] <= export_gguf.BOUNDS["f16"]["max_logit_difference"]
    assert base_only["max_logit_difference"] > 10 * with_lora["max_logit_difference"]
    print(f"base + LoRA: {with_lora}; base alone: {base_only}")


# The Ollama Modelfile ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory):
    """Go's text/template (what Ollama renders TEMPLATE with), built once."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go; .ci/run installs it)")
    binary = tmp_path_factory.mktemp("go") / "render_template"
    subprocess.run(["go", "build", "-o", str(binary), "tests/go/render_template.go"], cwd=REPO_ROOT, check=True,
                   env={**os.environ, "GOCACHE": str(binary.parent / "cache"), "GOFLAGS": "-mod=mod"})
    return binary


def go_render(renderer, template: str, messages: list[dict], tmp_path) -> str:
    path = tmp_path / "template.txt"
    path.write_text(template, encoding="utf-8")
    return subprocess.run([str(renderer), str(path)], input=json.dumps(messages), capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="session")
def family_tokenizers(family_models):
    """Per tokenizer family, the tokenizer with the template a merged model ships: the training template (as the
    recipes choose it), without its {% generation %} tags."""
    from transformers import AutoTokenizer

    tokenizers = {}
    for name, folder in {"tiny-chatml": TINY_MODEL, **family_models}.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        template, _ = training_chat_template(tokenizer, name, assistant_only_loss=True)
        tokenizer.chat_template = plain_chat_template(template)
        tokenizers[name] = tokenizer
    return tokenizers


def assert_go_template_renders_like_jinja(tokenizer, go_renderer, tmp_path):
    system = "You are a careful assistant.\nAnswer briefly."
    template = gguf.turn_template(tokenizer, system)
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Is 38.5 C a fever?"},
            {"role": "assistant", "content": "Yes: above 38 C.\n\nRest and drink."},
            {"role": "user", "content": "And 37.9 C?"}]
    for messages, add in ((chat[:3], False), (chat[:2], True), (chat, True)):  # as Ollama renders them
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert template.head + go_render(go_renderer, template.go_template(), messages, tmp_path) == expected


@pytest.mark.parametrize("family", ["tiny-chatml", *FAMILIES])
def test_modelfile_template_renders_like_the_chat_template(family, family_tokenizers, go_renderer, tmp_path):
    """Go's text/template renders the Modelfile's template for system + user (+ assistant) exactly as the Jinja chat
    template renders it (less the BOS token the runtime adds)."""
    assert_go_template_renders_like_jinja(family_tokenizers[family], go_renderer, tmp_path)


def test_modelfile_template_of_the_real_model(real_model, go_renderer, tmp_path):
    """SmolLM2's BOS token is <|im_start|>, which its template writes and its tokenizer does not add: the Go
    template must write it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert gguf.turn_template(tokenizer, None).head == ""
    assert_go_template_renders_like_jinja(tokenizer, go_renderer, tmp_path)


@needs_llama_cpp
def test_modelfile_from_the_run(q8_export, medical_smoke_run, go_renderer, tmp_path):
    """The Modelfile names the GGUF, stops at the template's end-of-turn token and carries the run's system
    prompt; its TEMPLATE renders the run's conversations as the chat template does."""
    output_dir, _ = q8_export
    adapter_dir, _ = medical_smoke_run
    text = (output_dir / "Modelfile").read_text()
    system_prompt = read_json(adapter_dir / "run_card.json")["system_prompt"]
    tokenizer = load_tokenizer(adapter_dir)
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert f"PARAMETER stop {json.dumps(tokenizer.eos_token)}\n" in text
    assert f'SYSTEM """{system_prompt}"""' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    chat = conversation(CHECK_PROMPTS[0], system_prompt)
    plain = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert go_render(go_renderer, template, chat, tmp_path) == plain


# Bad input ---------------------------------------------------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def test_adapter_without_run_card(medical_smoke_run, tmp_path):
    adapter_dir, _ = medical_smoke_run
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, bare / name)
    line = one_line_error(export("--adapter", str(bare), "--output_dir", str(tmp_path / "out")))
    assert "run_card.json: not found" in line


def test_unsupported_architecture(medical_smoke_run, tmp_path):
    adapter_dir, _ = medical_smoke_run
    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["NotInLlamaCppForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    line = one_line_error(export("--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "out"),
                                 "--base_model", str(base)))
    assert "NotInLlamaCppForCausalLM" in line and "no support for this architecture" in line


def test_missing_bindings_and_toolchain(monkeypatch):
    """Without llama-cpp-python and without cmake: say to install both, from the file that pins it."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "cmake" else f"/usr/bin/{tool}")
    with pytest.raises(RecipeError) as e:
        gguf.llama_cpp()
    assert "install cmake" in str(e.value) and "pip install -r requirements-gguf.txt" in str(e.value)


def test_converters_unreachable(monkeypatch, tmp_path):
    """No cached converters and no index to fetch them from: a one-line error saying what to do."""
    monkeypatch.setenv("LORA_RECIPES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(RecipeError) as e:
        gguf.converter_dir()
    assert "cannot download llama.cpp's converters" in str(e.value) and "\n" not in str(e.value)


# The real small model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_export(real_model, tmp_path_factory):
    """The real-model run of bench/gguf_parity.py (whose figures the deploy page quotes): a short LoRA run on
    SmolLM2-135M-Instruct, merged, exported as f16 with its GGUF LoRA."""
    root = tmp_path_factory.mktemp("real-gguf")
    adapter, merged = gguf_parity.train_and_merge(real_model, root)
    gguf_parity.export(adapter, merged, root / "gguf", "f16")
    return root


@needs_llama_cpp
@pytest.mark.slow
def test_real_model_gguf_matches_and_stops(real_export):
    """SmolLM2-135M-Instruct + a medical adapter: the export's own check held (prompt tokens, logits, the top token
    at decisive positions, greedy answers up to a near tie, the LoRA on the base), and a full greedy answer from
    llama.cpp is transformers' up to a near tie and ends at the end-of-turn token."""
    record = read_json(real_export / "gguf" / "gguf_check.json")
    bound = export_gguf.BOUNDS["f16"]["max_logit_difference"]
    for check in record["checks"]:
        assert check["max_logit_difference"] <= bound and check["decisive_top1_agreement"] == 1.0
        assert check["greedy_prompts"] == 3 and all(g["accepted"] for g in check["greedy"])
        print(f"real model {check['file']} + {check['lora']}: {check}")
    tokenizer, chats, ids, _, model = reference(real_export / "merged")
    end_of_turn = end_of_turn_token_id(tokenizer)
    chat = conversation("What is a normal adult resting heart rate? One sentence.", chats[0][0]["content"])
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    with gguf.GGUFModel(real_export / "gguf" / "model-f16.gguf") as llm:
        assert llm.chat_prompt_ids(chat) == prompt["input_ids"]
        answer = llm.greedy(prompt["input_ids"], 200)
    expected, leads = gguf.transformers_greedy(model, tokenizer, prompt["input_ids"], 200, end_of_turn)
    greedy = gguf.compare_greedy(expected, leads, answer, export_gguf.TIE_MARGIN)
    assert greedy["accepted"], greedy
    assert answer[-1] == end_of_turn and end_of_turn not in answer[:-1]
    print(f"real model answer ({len(answer)} tokens, {greedy}): {tokenizer.decode(answer)!r}")


def test_committed_parity_figures_meet_the_bounds():
    """bench/results/gguf-cpu.* (the deploy page's figures): every quantisation exported with its GGUF LoRA, each
    check within today's bounds, more bits closer to the merged model, and the table written from the JSON."""
    results = read_json(REPO_ROOT / "bench" / "results" / "gguf-cpu.json")
    assert tuple(results["exports"]) == gguf_parity.QUANTIZATIONS
    for quantization, record in results["exports"].items():
        assert record["bounds"] == export_gguf.BOUNDS[quantization] and record["tie_margin"] == export_gguf.TIE_MARGIN
        assert [(c["file"], c["lora"]) for c in record["checks"]] == [
            (f"model-{quantization}.gguf", None), (f"base-{quantization}.gguf", "adapter-f16.gguf")]
        for check in record["checks"]:
            assert export_gguf.failures(check, quantization) == []
    kl = [results["exports"][q]["checks"][0]["mean_kl"] for q in gguf_parity.QUANTIZATIONS]
    assert kl == sorted(kl)
    assert (REPO_ROOT / "bench" / "results" / "gguf-cpu.md").read_text() == gguf_parity.markdown(results)


def test_committed_build_figures_are_for_the_pinned_requirement():
    """bench/results/llama-cpp-build-cpu.* timed the line requirements-gguf.txt has now: one compile, then pip's
    wheel cache, and the bindings imported."""
    results = read_json(REPO_ROOT / "bench" / "results" / "llama-cpp-build-cpu.json")
    assert results["requirement"] == llama_cpp_build.requirement_line()
    assert results["installs"]["first"]["built"] and not results["installs"]["cached"]["built"]
    assert results["bindings"]["version"] == gguf.LLAMA_CPP_PYTHON.split("==")[1]
    assert not any("mtmd" in library for library in results["bindings"]["libraries"])  # -DLLAVA_BUILD=OFF
    table = (REPO_ROOT / "bench" / "results" / "llama-cpp-build-cpu.md").read_text()
    assert table == llama_cpp_build.markdown(results)
