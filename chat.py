"""Chat with a trained or fine-tuned checkpoint; replies stream token by token through the KV cache.

    python chat.py                                   # the newest fine-tuned checkpoint, else the newest pretrained
    python chat.py --checkpoint logs/RUN/state_step000075.pt --system "You are a player in a comedy."
    python chat.py --prompt "Good morrow"            # answer once and exit
    printf 'Hello\\nWho art thou?\\n' | python chat.py  # stdin lines are user turns; replies blank-line separated

A chat model (finetune.py) is prompted with model.py's chat template. A base model gets a plain-text dialogue in
the play format of the default corpus (speaker names in capitals, a blank line after each speech), and its reply
ends at the first blank line, where the next speaker would begin.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TextIO

import inference as I
import model as M
import runs as R

HELP = """commands (a line that is exactly one of these):
  quit, exit          leave (Ctrl-D too)
  clear               forget the conversation and the system prompt
  new                 start a new conversation, keeping the system prompt
  help                this text
  /system TEXT        set the system prompt
  /temperature 0.7    /top_k 50    /top_p 0.95    /max_new_tokens 200    /seed 1
  /settings           show the current settings
Ctrl-C stops a reply and keeps what was written; Ctrl-C at the prompt does nothing."""
SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int, "seed": int}


def setting_problem(name: str, value: float) -> str | None:
    """What is wrong with a sampling setting (a flag or a /command), or None."""
    if name in ("temperature", "top_k") and value < 0:
        return "must be >= 0"
    if name == "top_p" and not 0 < value <= 1:
        return "must be in (0, 1]"
    if name == "max_new_tokens" and value < 1:
        return "must be >= 1"
    return None


@dataclass
class Conversation:
    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) pairs


@dataclass
class Settings:
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 200
    seed: int = 0


def render(im: I.InferenceModel, conv: Conversation, user: str) -> list[int]:
    """Prompt ids for the reply to `user` after the conversation so far."""
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    for u, a in conv.turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return I.render_prompt(im.tokenizer, im.kind, messages + [{"role": "user", "content": user}])


def fit(im: I.InferenceModel, conv: Conversation, user: str, budget: int) -> tuple[list[int], str]:
    """Drop the oldest turns (never the system prompt) until the prompt fits; returns (ids, note for the user)."""
    dropped = 0
    while True:
        ids = render(im, conv, user)
        if len(ids) <= budget or not conv.turns:
            break
        conv.turns.pop(0)
        dropped += 1
    note = f"[dropped the {dropped} oldest turn(s) to fit the {budget}-token prompt budget]" if dropped else ""
    if len(ids) > budget:  # the message alone is too long: keep its end, re-rendered until the prompt fits
        tokens = im.tokenizer.encode(user)
        keep = budget - (len(ids) - len(tokens))
        while keep >= 1:
            ids = render(im, conv, im.tokenizer.decode(tokens[-keep:]))
            if len(ids) <= budget:
                break
            keep -= len(ids) - budget  # text re-tokenises differently where it was cut
        if keep < 1:
            raise M.ConfigError(f"the system prompt alone exceeds the {budget}-token prompt budget; shorten it "
                                f"or lower /max_new_tokens")
        note = (note + " " if note else "") + f"[your message was cut to its last {keep} tokens]"
    return ids, note


class Chat:
    """The conversation loop, shared by the interactive, piped and one-shot modes."""

    def __init__(self, im: I.InferenceModel, args: argparse.Namespace, out: TextIO, interactive: bool):
        self.im, self.out, self.interactive = im, out, interactive
        self.context = args.context or min(max(im.hp.max_seq_len, 1024), 4096)
        self.conv = Conversation(system=args.system or "")
        self.settings = Settings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
        self.replies = 0
        self.use_cache = not args.no_kv_cache
        fit(im, Conversation(system=self.conv.system), "", self.budget())  # a too-long --system fails at start

    def budget(self) -> int:
        """Prompt tokens: the context less the room kept for the reply."""
        return self.context - min(self.settings.max_new_tokens, self.context // 2)

    def banner(self) -> str:
        im = self.im
        kind = (f"chat model (fine-tuned, chat template v{M.CHAT_TEMPLATE_VERSION})" if im.kind == "chat" else
                "base model (not fine-tuned): a plain-text play-format dialogue; replies end at the first blank line")
        weights = "" if im.weights == "fp32" else f", {im.weights} weights"
        compiled = ", compiled decoding" if im.compiled else ""
        return (f"chat.py: {im.path} (step {im.step}, preset {im.hp.preset}, {im.device}{weights}{compiled})\n{kind}\n"
                f"context {self.context} tokens; type 'help' for commands, Ctrl-C stops a reply, Ctrl-D leaves")

    def reply(self, user: str) -> str:
        try:
            ids, note = fit(self.im, self.conv, user, self.budget())
        except M.ConfigError as e:
            if not self.interactive:
                raise
            print(f"[{e}]", file=self.out, flush=True)
            return ""
        if note and self.interactive:
            print(note, file=self.out, flush=True)
        text = ""
        if self.replies == 0:
            I.announce_decode_compile(self.im)
        try:
            s, room = self.settings, self.context - len(ids)
            for piece in I.stream_reply(self.im, ids, max_new_tokens=max(1, min(s.max_new_tokens, room)),
                                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                        seed=s.seed + self.replies, use_cache=self.use_cache):
                text += piece
                if self.interactive:
                    print(piece, end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            if self.interactive:
                print(" [interrupted]", end="", file=self.out)
        self.replies += 1
        self.conv.turns.append((user, text.strip()))
        # piped and one-shot output: only the replies, each followed by a blank line (chat replies may span lines)
        print("" if self.interactive else text.strip() + "\n", file=self.out, flush=True)
        return text.strip()

    def command(self, line: str) -> bool | None:
        """Run line if it is a command: False = leave, True = handled, None = not a command."""
        word, _, rest = line.strip().partition(" ")
        name = word.lower().lstrip("/")
        if name in ("quit", "exit") and not rest:
            return False
        if name in ("clear", "new", "help", "settings") and not rest:
            if name == "clear":
                self.conv = Conversation()
            elif name == "new":
                self.conv = Conversation(system=self.conv.system)
            self.say({"clear": "[conversation and system prompt cleared]", "new": "[new conversation]",
                      "help": HELP, "settings": str(self.settings)}[name])
            return True
        if word.startswith("/") and name == "system":
            self.conv.system = rest.strip()
            self.say(f"[system prompt set: {self.conv.system!r}]")
            return True
        if word.startswith("/") and name in SETTINGS:
            try:
                value = SETTINGS[name](rest.strip())
            except ValueError:
                self.say(f"[/{name} needs a valid {SETTINGS[name].__name__}, got {rest.strip()!r}]")
                return True
            if problem := setting_problem(name, value):
                self.say(f"[/{name} {problem}, got {rest.strip()}]")
                return True
            setattr(self.settings, name, value)
            self.say(f"[{name} = {value}]")
            return True
        if word.startswith("/"):
            self.say(f"[unknown command {word}; type help]")
            return True
        return None

    def say(self, text: str) -> None:
        if self.interactive:
            print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """One input line; False when the user leaves."""
        if not line.strip():
            return True
        handled = self.command(line)
        if handled is not None:
            return handled
        self.reply(line)
        return True


def interactive_loop(chat: Chat) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input(), where available
    except ImportError:
        pass
    print(chat.banner(), file=chat.out, flush=True)
    while True:
        try:
            line = input("you> ")
        except KeyboardInterrupt:
            print("\n[Ctrl-D or quit to leave]", file=chat.out, flush=True)
            continue
        except EOFError:
            print(file=chat.out)
            return
        if not line.strip():
            continue
        handled = chat.command(line)
        if handled is False:
            return
        if handled is None:
            print("bot> ", end="", file=chat.out, flush=True)
            chat.reply(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = R.OneLineParser(prog="chat.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", default="latest", help="'latest' (a fine-tuned one first) or a path")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the full context every token (reference)")
    I.add_inference_flags(p, default_weights="auto")
    p.add_argument("--context", type=int, default=0, help="tokens of conversation kept (default: the model's "
                   "row length, at least 1024, at most 4096)")
    args = p.parse_args(argv)
    for name in ("temperature", "top_k", "top_p", "max_new_tokens"):
        if problem := setting_problem(name, getattr(args, name)):
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} {problem}")
    if args.context and args.context < 2 * M.BLOCK_SIZE:
        p.error(f"--context={args.context} must be at least {2 * M.BLOCK_SIZE}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdin.reconfigure(errors="replace")  # binary or mis-encoded input becomes U+FFFD, not a crash
    try:
        im = I.load_for_inference(args.checkpoint, args.log_dir, args.device, args.dtype, prefer_chat=True,
                                  weights=args.weights, compile_decode=args.compile == "on")
        if args.prompt is not None:
            chat = Chat(im, args, sys.stdout, interactive=False)
            print(chat.banner(), file=sys.stderr, flush=True)
            chat.reply(args.prompt)
        elif sys.stdin.isatty():
            interactive_loop(Chat(im, args, sys.stdout, interactive=True))
        else:
            chat = Chat(im, args, sys.stdout, interactive=False)
            print(chat.banner(), file=sys.stderr, flush=True)
            for line in sys.stdin:
                if not chat.handle(line.rstrip("\n")):
                    break
    except M.USER_ERRORS as e:
        R.exit_with(2, "chat.py", str(e))


if __name__ == "__main__":
    main()
