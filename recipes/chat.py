"""Chat with a trained adapter or a merged model: interactively, one prompt, or a batch file.

Interactive chat with the offline demo's adapter (streamed; /adapter NAME switches, /reset starts over, /exit
or Ctrl-D quits):
    python recipes/chat.py --adapter outputs/medical-smoke

One answer; a batch of JSONL rows ({"prompt": ...} or {"messages": [...]}, optional "adapter", other fields kept):
    python recipes/chat.py --adapter outputs/medical-smoke --prompt "Which test confirms hypothyroidism?"
    python recipes/chat.py --adapter outputs/medical-smoke --input questions.jsonl --output answers.jsonl

A merged model (recipes/merge.py), deterministic answers:
    python recipes/chat.py --model_name_or_path outputs/medical-smoke-merged --greedy

Several domains on one base, loaded once; each request picks its adapter:
    python recipes/chat.py --adapter medical=outputs/medical-qwen2.5-1.5b-qlora \
        --adapter legal=outputs/legal-qwen2.5-1.5b-qlora --use_adapter legal \
        --prompt "Can my employer read my work email?"

The base is loaded as in training (4-bit for a QLoRA adapter, from run_card.json); the system prompt is the one
the adapter was trained with unless --system_prompt says otherwise (batch rows with their own system turn keep
it). Answers are not professional advice.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from lora_recipes.data import numbered_json_lines  # noqa: E402
from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402
from lora_recipes.inference import (  # noqa: E402
    ChatModel,
    GenerationArguments,
    Request,
    check_adapter,
    conversation,
    parse_flags,
    read_adapters,
    with_system_prompt,
)

ROLES = ("system", "user", "assistant")
COMMANDS = "/adapter NAME switches adapter, /reset starts a new conversation, /exit (or Ctrl-D) quits"


@dataclass
class ChatArguments:
    adapter: list[str] = field(default_factory=list, metadata={
        "help": "Adapter folder (DIR) or NAME=DIR; repeat for several adapters on one base.", "action": "extend"})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A standalone model instead of adapters, e.g. a folder written by recipes/merge.py."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model for the adapters instead of the one in their run_card.json."})
    use_adapter: str | None = field(default=None, metadata={
        "help": "Adapter for --prompt, for batch rows without an 'adapter' field and to start the chat with. "
                "Default: the first --adapter."})
    prompt: str | None = field(default=None, metadata={"help": "Answer this one prompt and exit."})
    input: str | None = field(default=None, metadata={
        "help": "JSONL file of requests: {\"prompt\": ...} or {\"messages\": [...]}, optional \"adapter\"."})
    output: str | None = field(default=None, metadata={"help": "JSONL file for the answers to --input."})
    batch_size: int = field(default=8, metadata={"help": "Requests generated together in a batch."})


def read_requests(path: Path, adapters: list[str], default_adapter: str | None) -> list[dict]:
    """The rows of a JSONL request file, each checked; a bad line stops the run naming the file and line."""
    try:
        numbered = numbered_json_lines(path)
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
    rows = []
    for number, row in numbered:
        where = f"{path}: line {number}"
        if ("prompt" in row) == ("messages" in row):
            raise RecipeError(f"{where}: needs exactly one of the fields 'prompt' (a string) and 'messages' (a list)")
        if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"].strip()):
            raise RecipeError(f"{where}: field 'prompt': expected a non-empty string, got {row['prompt']!r}")
        if "messages" in row:
            messages = row["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    for m in messages)):
                raise RecipeError(f"{where}: field 'messages': expected a list of {{role, content}} with role "
                                  f"in {', '.join(ROLES)}")
            if messages[-1]["role"] != "user":
                raise RecipeError(f"{where}: field 'messages': the last message must be the user's")
        row.setdefault("adapter", default_adapter)
        try:
            check_adapter(row["adapter"], adapters)
        except RecipeError as e:
            raise RecipeError(f"{where}: field 'adapter': {e}") from None
        rows.append(row)
    if not rows:
        raise RecipeError(f"{path}: no requests in the file")
    return rows


def interactive(chat: ChatModel, args: GenerationArguments, adapter: str | None) -> None:
    """A terminal chat with streamed answers, until /exit or the end of the input."""
    from transformers import TextStreamer

    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"Chatting with {adapter or 'the model'} ({COMMANDS}). Answers are not professional advice.",
          file=sys.stderr)
    history = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            history = []
            print("(new conversation)")
        elif line.startswith("/adapter"):
            name = line.removeprefix("/adapter").strip()
            try:
                check_adapter(name or None, chat.adapters)
            except RecipeError as e:
                print(f"error: {e}")
                continue
            if name:
                adapter, history = name, []
            print(f"(adapter: {adapter}; loaded: {', '.join(chat.adapters) or 'none'})")
        elif line.startswith("/"):
            print(f"commands: {COMMANDS}")
        elif line:
            messages = ([*history, {"role": "user", "content": line}] if history
                        else conversation(line, chat.system_prompt(adapter, args)))
            print("assistant> ", end="", flush=True)
            (answer,) = chat.generate([messages], args, adapter, streamer=streamer)
            if answer.finish_reason == "length":
                print(f"(stopped at --max_new_tokens {args.max_new_tokens})")
            history = [*messages, {"role": "assistant", "content": answer.text}]


def main(chat_args: ChatArguments, gen_args: GenerationArguments) -> None:
    # 1. One mode per run, adapter folders and every batch row checked before the model loads
    if bool(chat_args.adapter) == bool(chat_args.model_name_or_path):
        raise RecipeError("give one of --adapter DIR (one or more) and --model_name_or_path MODEL")
    if (chat_args.input is None) != (chat_args.output is None):
        raise RecipeError("--input and --output go together")
    if chat_args.prompt is not None and chat_args.input is not None:
        raise RecipeError("--prompt and --input are two modes: choose one")
    if chat_args.batch_size <= 0:
        raise RecipeError(f"batch_size must be > 0, got {chat_args.batch_size}")
    adapters = read_adapters(chat_args.adapter, chat_args.base_model)
    names = [a.name for a in adapters]
    check_adapter(chat_args.use_adapter, names)
    adapter = chat_args.use_adapter or (names[0] if names else None)
    rows = None
    if chat_args.input is not None:
        if Path(chat_args.output).resolve() == Path(chat_args.input).resolve():
            raise RecipeError("--output is the --input file: write the answers elsewhere")
        rows = read_requests(Path(chat_args.input), names, adapter)

    # 2. The base once, with every adapter on it (or the merged model)
    chat = ChatModel.load(adapters, chat_args.model_name_or_path)

    # 3. One streamed answer, a batch file, or the interactive chat
    if chat_args.prompt is not None:
        from transformers import TextStreamer

        chat.generate([conversation(chat_args.prompt, chat.system_prompt(adapter, gen_args))], gen_args, adapter,
                      streamer=TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True))
    elif rows is not None:
        requests = []
        for row in rows:
            system_prompt = chat.system_prompt(row["adapter"], gen_args)
            messages = (with_system_prompt(row["messages"], system_prompt) if "messages" in row
                        else conversation(row["prompt"], system_prompt))
            requests.append(Request(messages, row["adapter"]))
        answers = chat.answer(requests, gen_args, chat_args.batch_size)
        output = Path(chat_args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w", encoding="utf-8") as f:
            for row, answer in zip(rows, answers, strict=True):
                f.write(json.dumps({**row, "answer": answer.text, "finish_reason": answer.finish_reason,
                                    "new_tokens": len(answer.token_ids)}, ensure_ascii=False) + "\n")
        stopped = sum(a.finish_reason == "length" for a in answers)
        print(f"{len(answers)} answers written to {output} ({stopped} stopped at --max_new_tokens "
              f"{gen_args.max_new_tokens})", file=sys.stderr)
    else:
        interactive(chat, gen_args, adapter)


@exit_on_recipe_error
def run(argv: list[str] | None = None) -> None:
    main(*parse_flags((ChatArguments, GenerationArguments), argv))


if __name__ == "__main__":
    run()
