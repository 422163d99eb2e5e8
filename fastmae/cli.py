"""`fastmae {pretrain, finetune, linprobe, knn, visualize, convert, bench, embed, segment}`: one subcommand per
config dataclass.

Flags and --help come from the dataclass fields (tyro); a command's module is imported only when run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
from collections.abc import Sequence

import tyro

from .commands.bench import BenchConfig
from .commands.convert import ConvertConfig
from .commands.embed import EmbedConfig
from .commands.finetune import FinetuneConfig
from .commands.knn import KnnConfig
from .commands.linprobe import LinprobeConfig
from .commands.pretrain import PretrainConfig
from .commands.segment import SegmentConfig
from .commands.visualize import VisualizeConfig
from .train.dist import cleanup
from .train.engine import NonFiniteLossError
from .train.runlock import release_all
from .weights.checkpoint import DiskFullError

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "fastmae.commands.pretrain:run_pretrain"),
    "finetune": (FinetuneConfig, "fastmae.commands.finetune:run_finetune"),
    "linprobe": (LinprobeConfig, "fastmae.commands.linprobe:run_linprobe"),
    "knn": (KnnConfig, "fastmae.commands.knn:run_knn"),
    "visualize": (VisualizeConfig, "fastmae.commands.visualize:run_visualize"),
    "convert": (ConvertConfig, "fastmae.commands.convert:convert_from_config"),
    "bench": (BenchConfig, "fastmae.commands.bench:run_bench"),
    "embed": (EmbedConfig, "fastmae.commands.embed:run_embed"),
    "segment": (SegmentConfig, "fastmae.commands.segment:run_segment"),
}


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation (CPU or GPU): a size a user asked for, not a bug."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        "can't allocate memory" in text or "CUDA out of memory" in text or "DefaultCPUAllocator" in text)


def recipe_named(args: Sequence[str]) -> str:
    """The value of --recipe among a command's arguments ('' when absent)."""
    for i, a in enumerate(args):
        if a == "--recipe" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--recipe="):
            return a.split("=", 1)[1]
    return ""


def parse(argv: Sequence[str] | None) -> object:
    """argv -> the command's config. With --recipe NAME the recipe's config is the default every flag overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = recipe_named(args[1:]) if args and args[0] in COMMANDS else ""
    if name:
        from .recipes import recipe

        cls = COMMANDS[args[0]][0]
        try:
            default = recipe(args[0], name)
        except ValueError as e:
            print(f"fastmae: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return _one_line_errors(lambda: tyro.cli(cls, default=default, args=args[1:], prog=f"fastmae {args[0]}",
                                                 use_underscores=True, description=cls.__doc__))
    return _one_line_errors(lambda: tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()},
        prog="fastmae",
        description="Masked autoencoders (MAE) for your own images: pretrain, evaluate, embed, segment, visualize, "
                    "convert, bench.",
        args=args,
        use_underscores=True,
    ))


def _one_line_errors(parse_fn):
    """Run a tyro parse; a malformed command line becomes one `fastmae: error: ...` line on stderr (exit 2).

    tyro draws its errors as a box of 5-40 lines (with every subcommand's help for a misspelt flag); the box's own
    words are kept: the problem, the flag it suggests, and where the help is. --help (stdout) is untouched.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = parse_fn()
    except SystemExit as e:
        text = captured.getvalue()
        if e.code not in (0, None) and text.strip():
            print(f"fastmae: error: {parser_error_line(text)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        sys.stderr.write(text)
        raise
    except BaseException:
        sys.stderr.write(captured.getvalue())  # whatever the parser said before it failed
        raise
    sys.stderr.write(captured.getvalue())  # warnings printed while parsing
    return cfg


def parser_error_line(box: str) -> str:
    """tyro's boxed error -> one line: `<problem>[; did you mean <flag> (<commands>)?]; see <help>`.

    tyro (rich) draws the box with line characters on a UTF-8 stream and as plain indented text with dashed
    rules elsewhere: sections are split at the rules, indentation is read relative to a section's first line.
    """
    boxed = "\u2502" in box
    sections: list[list[str]] = [[]]
    for raw in box.splitlines():
        if boxed:
            if "\u2502" not in raw:
                continue  # the top border (title) and the bottom one
            raw = raw[raw.index("\u2502") + 1 : raw.rindex("\u2502")]
        body = raw.strip()
        if len(body) >= 10 and set(body) <= {"\u2500", "-"}:
            sections.append([])
        else:
            sections[-1].append(raw.rstrip())
    if not boxed and len(sections) > 1:
        sections = sections[1:]  # the plain layout puts the title above the first rule
    sections = [sec for sec in sections if any(ln.strip() for ln in sec)]
    if not sections:
        return " ".join(box.split())

    def text(sec: list[str]) -> str:  # a section's words; a blank line ends a paragraph
        joined = re.sub(r" \(applied to [^)]*\)", "", "\n".join(sec))
        return "; ".join(" ".join(para.split()) for para in joined.split("\n\n") if para.strip())

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def flags_under(sec: list[str]) -> dict[str, list[str]]:  # flag -> the commands whose help lists it
        base, found, flag = indent(sec[0]), {}, ""
        for ln in sec[1:]:
            if ln.strip().startswith("-") and indent(ln) == base + 4:
                flag = ln.split()[0]
                found.setdefault(flag, [])
            elif flag and (cmd := re.match(r"in fastmae (\w+) --help", ln.strip())) and cmd.group(1) not in found[flag]:
                found[flag].append(cmd.group(1))
        return found

    first = text(sections[0])
    parts = [first.rstrip(".")]
    if first.startswith("Missing from"):  # required flags: their names, not their help
        parts = [f"missing required {', '.join(flags_under(sections[0]))}"]
    for sec in sections[1:]:
        words = text(sec)
        if words.startswith("Perhaps you meant") and (where := flags_under(sec)):
            named = [f"{f} ({', '.join(c)})" if c else f for f, c in list(where.items())[:3]]
            parts.append(f"did you mean {' or '.join(named)}?")
        elif words.startswith("Available subcommands"):
            parts.append(words[0].lower() + words[1:])
        elif (help_at := re.search(r"(fastmae[\w ]*--help)", words)) and words.startswith("For full helptext"):
            parts.append(f"see `{help_at.group(1)}`")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, turn user errors into one clear line and exit code 2."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read stdout has gone (`fastmae finetune --help | head`): stop quietly, as a shell tool does,
        # and point stdout at /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    cfg = parse(argv)  # --help exits here (0), a malformed command line too (one error line, exit code 2)
    target = next(t for cls, t in COMMANDS.values() if type(cfg) is cls)
    module, fn = target.split(":")
    run = getattr(importlib.import_module(module), fn)
    ok = False
    try:
        run(cfg)
        ok = True
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, NonFiniteLossError,
            DiskFullError) as e:
        if os.environ.get("FASTMAE_DEBUG"):
            raise
        print(f"fastmae: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (MemoryError, RuntimeError) as e:
        if os.environ.get("FASTMAE_DEBUG") or not is_out_of_memory(e):
            raise
        print(f"fastmae: error: out of memory ({str(e).splitlines()[0][:200]}); use a smaller model (--model.*), "
              f"a smaller --optim.batch_size, or a machine with more memory", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all()
        cleanup(wait_for_all=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
