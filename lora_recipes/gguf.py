"""GGUF for llama.cpp and Ollama: llama.cpp's own converters and quantiser, checked against transformers.

Nothing here converts or quantises by itself. The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`,
their `conversion/` package and `gguf-py`) come from the pinned llama-cpp-python sdist, fetched once with pip
(hash-checked) and cached; quantisation and the checks run llama.cpp through the llama-cpp-python bindings.
The Ollama Modelfile's Go template is derived from the training chat template and checked against it.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError
from .real_model import sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # runtime (requirements-gguf.txt) and converters' source: one pin
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # PyPI's sha256 of its sdist
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # names in llama_cpp
# The Modelfile's template is rendered for these messages and compared with the chat template; the contents are
# plain words, because a template may trim or escape what it is given.
PROBE = {"system": "SYSTEMPROBE", "user": "USERPROBE", "assistant": "ASSISTANTPROBE", "user2": "SECONDUSERPROBE"}


def cache_dir() -> Path:
    """Where the converters are kept: $LORA_RECIPES_CACHE, else ~/.cache/lora-recipes."""
    return Path(os.environ.get("LORA_RECIPES_CACHE") or Path.home() / ".cache" / "lora-recipes")


def converter_dir() -> Path:
    """llama.cpp's converters from the pinned sdist: downloaded by pip (hash-checked) on first use, then cached."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    target = cache_dir() / f"llama.cpp-converters-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        print(f"Downloading llama.cpp's converters ({LLAMA_CPP_PYTHON} source, 77 MB, once) into {target}")
        # the source (`--no-binary` for it alone: with `:all:`, pip also builds every build dependency from source)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                               "--require-hashes", "-r", str(requirement), "-d", tmp],
                              capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or len(sdists) != 1:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RecipeError(f"cannot download llama.cpp's converters ({LLAMA_CPP_PYTHON} source from PyPI: "
                              f"{last}): check the network, or copy a {target.name} folder into {target.parent}")
        if sha256(sdists[0]) != SDIST_SHA256:  # pip checked it; a second look costs a second
            raise RecipeError(f"{sdists[0].name}: sha256 differs from the pinned one: not using it")
        staging = Path(tmp) / "converters"
        with tarfile.open(sdists[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_PATHS]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        staging.rename(target)  # atomic: a half-extracted folder is never taken for the cache
    return target


def supported_architectures(converters: Path) -> set[str]:
    """The Hugging Face architectures llama.cpp's converter has a class for (its TEXT_MODEL_MAP)."""
    tree = ast.parse((converters / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise RecipeError(f"{converters}/conversion/__init__.py: no TEXT_MODEL_MAP (not the pinned converters?)")


def check_architecture(config, converters: Path) -> str:
    """The model's architecture, or a one-line error when llama.cpp cannot convert it."""
    architectures = getattr(config, "architectures", None) or []
    supported = supported_architectures(converters)
    if not architectures or architectures[0] not in supported:
        name = architectures[0] if architectures else f"model_type {config.model_type!r} (no architectures)"
        raise RecipeError(f"{name}: llama.cpp's converter ({LLAMA_CPP_PYTHON}) has no support for this "
                          f"architecture, so no GGUF can be made; serve the merged safetensors model instead "
                          f"(recipes/merge.py, then vLLM or transformers)")
    return architectures[0]


def run_converter(converters: Path, script: str, *args: str) -> float:
    """Run one of llama.cpp's converter scripts (see `lora_recipes.llama_cpp_convert`); returns the seconds taken."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_recipes.llama_cpp_convert", str(converters), script, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(" ")]
        raise RecipeError(f"llama.cpp's {script} failed: {lines[-1] if lines else 'no output'}")
    return time.perf_counter() - start


def convert_model(converters: Path, model_dir: Path, outfile: Path) -> float:
    """A Hugging Face model folder into an f16 GGUF (weights, tokenizer, chat template); returns seconds."""
    return run_converter(converters, "convert_hf_to_gguf.py", str(model_dir), "--outfile", str(outfile),
                         "--outtype", "f16")


def convert_lora(converters: Path, adapter_dir: Path, base_dir: Path, outfile: Path) -> float:
    """A PEFT LoRA adapter into a GGUF LoRA (llama.cpp `--lora`, Ollama `ADAPTER`); returns seconds."""
    return run_converter(converters, "convert_lora_to_gguf.py", str(adapter_dir), "--base", str(base_dir),
                         "--outfile", str(outfile), "--outtype", "f16")


def llama_cpp():
    """The llama-cpp-python bindings, or a one-line error saying how to get them (they build llama.cpp)."""
    try:
        import llama_cpp
    except ImportError:
        missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
        toolchain = (f"first install {' and '.join(missing)} (building it needs cmake and a C++ compiler), then "
                     if missing else "")
        raise RecipeError(f"llama-cpp-python is not installed: {toolchain}pip install -r requirements-gguf.txt "
                          "(it compiles llama.cpp the first time, then pip's wheel cache has it: "
                          "bench/results/llama-cpp-build-cpu.md)") from None
    return llama_cpp


def quantize(source: Path, target: Path, quantization: str) -> float:
    """Quantise an f16 GGUF with llama.cpp's quantiser (`llama_model_quantize`); returns seconds."""
    import ctypes

    bindings = llama_cpp()
    params = bindings.llama_model_quantize_default_params()
    params.ftype = getattr(bindings, LLAMA_FTYPES[quantization])
    params.nthread = os.cpu_count() or 1
    start = time.perf_counter()
    if bindings.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RecipeError(f"llama.cpp could not quantise {source} to {quantization}")
    return time.perf_counter() - start


class GGUFModel:
    """A GGUF file loaded by llama.cpp (llama_cpp.Llama), optionally with a GGUF LoRA; use it in a `with` block.

    Closed explicitly: left to interpreter exit, llama-cpp-python's destructor raises a TypeError.
    """

    def __init__(self, path: Path, lora: Path | None = None, n_ctx: int = 512):
        self.llm = llama_cpp().Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                                     logits_all=True, n_threads=os.cpu_count(), seed=0, verbose=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.llm.close()

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokens llama-cpp-python builds for a chat from the GGUF's own chat template (its chat completion)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        metadata = self.llm.metadata
        vocab = self.llm._model
        formatter = Jinja2ChatFormatter(
            template=metadata["tokenizer.chat_template"],
            eos_token=vocab.token_get_text(vocab.token_eos()),
            bos_token=vocab.token_get_text(vocab.token_bos()) if vocab.token_bos() >= 0 else "",
        )
        result = formatter(messages=messages)
        return self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)

    def logits(self, ids: list[int]):
        """Float32 logits for every position of `ids` (numpy, [len(ids), vocab])."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[:len(ids)].copy()

    def is_end_of_generation(self, token_id: int) -> bool:
        return bool(llama_cpp().llama_vocab_is_eog(self.llm._model.vocab, token_id))

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation by llama.cpp's sampler, ending with the end-of-generation token if one comes."""
        generated = []
        self.llm.reset()
        for token in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            generated.append(token)
            if self.is_end_of_generation(token) or len(generated) >= max_new_tokens:
                break
        return generated


def top_margin(logits):
    """How far the top logit is above the second, per position (a tensor [..., vocab] -> [...])."""
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def compare_logits(reference: list, candidate: list, tie_margin: float) -> dict:
    """How far GGUF logits are from transformers' (lists of [positions, vocab] arrays, one per prompt).

    Top-1 agreement is counted over all positions and, apart, over the decisive ones, where transformers' top logit
    leads the second by more than `tie_margin`; at the other positions (near ties) the two may pick different
    tokens without either being wrong, so they are counted (`near_tie_flips`), not judged.
    """
    import torch

    difference, agree, kl, positions, decisive, decisive_agree, flips = 0.0, 0, 0.0, 0, 0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref, cand = (torch.as_tensor(x).float().reshape(-1, x.shape[-1]) for x in (ref, cand))  # [positions, vocab]
        difference = max(difference, (ref - cand).abs().max().item())
        same = ref.argmax(-1) == cand.argmax(-1)
        clear = top_margin(ref) > tie_margin
        agree += same.sum().item()
        decisive += clear.sum().item()
        decisive_agree += (same & clear).sum().item()
        flips += (~same & ~clear).sum().item()
        log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()  # KL(transformers || GGUF), summed over positions
        positions += ref.shape[0]
    return {"max_logit_difference": difference, "top1_agreement": agree / positions, "mean_kl": kl / positions,
            "positions": positions, "tie_margin": tie_margin, "decisive_positions": decisive,
            "decisive_top1_agreement": decisive_agree / decisive if decisive else 1.0,
            "near_ties": positions - decisive, "near_tie_flips": flips}


def transformers_greedy(model, tokenizer, ids: list[int], max_new_tokens: int, eos_token_id) -> tuple[list, list]:
    """transformers' greedy answer to the prompt `ids` and, per answer token, its logit's lead over the second."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [top_margin(step[0].float()).item() for step in out.logits]


def compare_greedy(expected: list[int], margins: list[float], answer: list[int], tie_margin: float) -> dict:
    """A GGUF's greedy answer against transformers' (`expected`, with its per-token `margins`).

    Up to where they part, both continued the same tokens, so at that step both saw the same context: they may part
    only where transformers' top two logits were a near tie (lead <= `tie_margin`). `accepted` says whether they
    did; `diverged_at` (the answer token where they part) and `margin` (transformers' lead there) report it.
    """
    common = next((i for i, (e, a) in enumerate(zip(expected, answer, strict=False)) if e != a),
                  min(len(expected), len(answer)))
    diverged = common < max(len(expected), len(answer))
    margin = margins[common] if diverged and common < len(margins) else None
    first_near_tie = next((i for i, m in enumerate(margins) if m <= tie_margin), None)
    return {"tokens": len(expected), "identical": not diverged, "first_near_tie": first_near_tie,
            "diverged_at": common if diverged else None, "margin": margin,
            "accepted": not diverged or (margin is not None and margin <= tie_margin)}


# Ollama Modelfile ---------------------------------------------------------------------------------------------


@dataclass
class TurnTemplate:
    """A chat template as Ollama needs it: per role, the text before and after the content; what starts the
    assistant's answer after a user turn, and what closes a conversation that ends with an answer (Phi-3's EOS);
    `fold`: for a template without a system role, what joins the system prompt to the first user message instead.
    `head` is the BOS token where the template writes it and the tokenizer adds it (so does the runtime, and the Go
    template leaves it out)."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    close: str = ""
    fold: str | None = None

    def render(self, messages: list[dict]) -> str:
        """`head` + what the Go template renders: the generation prompt after a user turn, `close` after an answer."""
        text, system = self.head, None
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system" and self.fold is not None:
                system = content
                continue
            if role == "user" and system is not None:
                content, system = system + self.fold + content, None
            text += self.prefix[role] + content + self.suffix[role]
        return text + (self.close if messages[-1]["role"] == "assistant" else self.generation_prompt)

    def go_template(self) -> str:
        """Ollama's TEMPLATE (Go text/template over .Messages); every literal is a quoted string action, so the
        layout's whitespace is trimmed and never reaches the prompt."""

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        def turn(role: str) -> str:
            content = "{{ .Content }}"
            if role == "user" and self.fold is not None:
                content = (f'{{{{ if $system }}}}{{{{ $system }}}}{lit(self.fold)}{{{{ $system = "" }}}}{{{{ end }}}}'
                           f"{content}")
            return f"{lit(self.prefix[role])}{content}{lit(self.suffix[role])}"

        system = '{{ $system = .Content }}' if self.fold is not None else turn("system")
        return ("{{- $system := \"\" }}\n" if self.fold is not None else "") + (
            "{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if eq .Role "system" }}}}{system}\n'
            f'{{{{- else if eq .Role "user" }}}}{turn("user")}\n'
            f'{{{{- else if eq .Role "assistant" }}}}{turn("assistant")}\n'
            "{{- end }}\n"
            f'{{{{- if and $last (ne .Role "assistant") }}}}{lit(self.generation_prompt)}'
            f"{{{{ else if $last }}}}{lit(self.close)}{{{{ end }}}}\n"
            "{{- end }}")


def split_template(tokenizer) -> TurnTemplate:
    """Read each role's text around its content off the chat template, by rendering probe conversations.

    `turn_template` checks the result against the chat template, so a template this cannot describe is an error,
    not a wrong Modelfile.
    """
    s, u, a, u2 = (PROBE[k] for k in ("system", "user", "assistant", "user2"))
    chat = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a},
            {"role": "user", "content": u2}]

    def render(messages, add=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)

    full, prompted = render(chat), render(chat, add=True)
    # Where the two part: after the last token they share (Phi-3 closes with EOS where others add nothing)
    ids, offsets = (tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)[k]
                    for k in ("input_ids", "offset_mapping"))
    prompted_ids = tokenizer(prompted, add_special_tokens=False)["input_ids"]
    pairs = enumerate(zip(ids, prompted_ids, strict=False))
    shared = next((i for i, (x, y) in pairs if x != y), min(len(ids), len(prompted_ids)))
    common = offsets[shared - 1][1] if shared else 0
    if full[:common] != prompted[:common] or u2 not in full[:common]:
        raise ValueError("the generation prompt does not follow the last user turn")
    close, generation_prompt, full = full[common:], prompted[common:], full[:common]
    before_s, rest = full.split(s, 1)
    s_to_u, rest = rest.split(u, 1)
    u_to_a, rest = rest.split(a, 1)
    a_to_u2, user_end = rest.split(u2, 1)
    assistant_end = render(chat[:3]).split(a, 1)[1].removesuffix(close)
    if not (u_to_a.startswith(user_end) and a_to_u2.startswith(assistant_end)):
        raise ValueError("a turn is followed by text that depends on the next turn")
    user_prefix = a_to_u2[len(assistant_end):]
    # The BOS the template writes is left to the runtime only where the tokenizer adds it itself (SmolLM2's BOS is
    # <|im_start|>, which its template writes as the start of the first turn and its tokenizer does not add)
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    head = bos if adds_bos and before_s.startswith(bos) else ""
    prefix = {"user": user_prefix, "assistant": u_to_a[len(user_end):]}
    suffix = {"user": user_end, "assistant": assistant_end}
    if before_s == head + user_prefix:  # no system turn: the system prompt opens the first user message
        return TurnTemplate(head=head, prefix=prefix, suffix=suffix, generation_prompt=generation_prompt,
                            close=close, fold=s_to_u)
    if not s_to_u.endswith(user_prefix):
        raise ValueError("the system turn is not followed by the user turn as an assistant turn is")
    return TurnTemplate(head=head, prefix={"system": before_s[len(head):], **prefix},
                        suffix={"system": s_to_u[:len(s_to_u) - len(user_prefix)], **suffix},
                        generation_prompt=generation_prompt, close=close)


def check_conversations(system_prompt: str | None) -> list[list[dict]]:
    """The conversations a Modelfile template must render as the chat template does: system + user (+ assistant,
    + another user turn), with the run's system prompt and with the probe words. A conversation that ends with a
    user turn is rendered with the generation prompt, as Ollama renders a prompt."""
    chats = []
    for system, user, answer in ((PROBE["system"], PROBE["user"], PROBE["assistant"]),
                                 (system_prompt, "What should I check first?", "Start with the basics.")):
        if system is None:
            continue
        turns = [{"role": "system", "content": system}, {"role": "user", "content": user},
                 {"role": "assistant", "content": answer}, {"role": "user", "content": PROBE["user2"]}]
        chats += [turns[:2], turns[:3], turns]
    return chats


def turn_template(tokenizer, system_prompt: str | None) -> TurnTemplate:
    """`split_template`, checked: it must render every conversation of `check_conversations` exactly as the chat
    template does, else a one-line error."""
    try:
        template = split_template(tokenizer)
    except ValueError as e:
        raise RecipeError(f"the chat template cannot be written as an Ollama template ({e}); use llama.cpp, "
                          "which reads the template from the GGUF") from None
    for chat in check_conversations(system_prompt):
        expected = tokenizer.apply_chat_template(chat, tokenize=False,
                                                 add_generation_prompt=chat[-1]["role"] != "assistant")
        if template.render(chat) != expected:
            raise RecipeError(f"the chat template cannot be written as an Ollama template: for {len(chat)} turns "
                              f"it renders {expected!r}, the derived template {template.render(chat)!r}; use "
                              "llama.cpp, which reads the template from the GGUF")
    return template


def modelfile(model_file: str, template: TurnTemplate, stop: str, system_prompt: str | None,
              adapter_file: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF (and a GGUF LoRA), the chat template, its end-of-turn token, the system
    prompt of the run."""
    go = template.go_template()
    if '"""' in go or (system_prompt and '"""' in system_prompt):
        raise RecipeError('the chat template or the system prompt contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines += [f'TEMPLATE """{go}"""', f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}"]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"
