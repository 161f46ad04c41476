"""The environment variables of the pipeline and the plugins, and `Settings`, which reads them.

The variable that turns a store on is its declaration's (`vllm_lora_resolvers.stores`), read by
`StoreDeclaration.source` through `Settings.value`; those of the stores whose backends import a
client library are defined here, so that their backends name them without importing the
declarations. `vllm_lora_resolvers.stores.ALL_VARIABLES` lists every variable, in order.

Store endpoints and credentials are deliberately absent: each client library reads its own
ecosystem's variables (``AWS_ENDPOINT_URL_S3``, ``STORAGE_EMULATOR_HOST``, ``HF_ENDPOINT``, ...).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path


class ConfigurationError(ValueError):
    """A variable is set but cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default (as documented) and meaning."""

    name: str
    default: str
    meaning: str


CACHE_DIR = Variable(
    "VLLM_LORA_RESOLVER_CACHE_DIR",
    "unset (required by every resolver of this package)",
    "Node-local cache root, shared with vLLM's built-in filesystem resolver.",
)
# The stores' variables (see the module's docstring).
S3_URI = Variable(
    "VLLM_LORA_RESOLVER_S3_URI",
    "unset: S3 resolver off",
    "`s3://bucket[/prefix]`; adapter NAME lives under `prefix/NAME/`.",
)
GCS_URI = Variable(
    "VLLM_LORA_RESOLVER_GCS_URI",
    "unset: GCS resolver off",
    "`gs://bucket[/prefix]`; adapter NAME lives under `prefix/NAME/`.",
)
AZURE_URI = Variable(
    "VLLM_LORA_RESOLVER_AZURE_URI",
    "unset: Azure resolver off",
    "`az://container[/prefix]` (or `abfss://container@account.dfs.core.windows.net[/prefix]`); "
    "adapter NAME lives under `prefix/NAME/`.",
)
HF_REPO_LIST = Variable(
    "VLLM_LORA_RESOLVER_HF_REPO_LIST",
    "unset: Hub resolver off",
    "Comma list of Hub repos; NAME is `org/repo` or `org/repo/subdir`.",
)
FS_DIR = Variable(
    "VLLM_LORA_RESOLVER_FS_DIR",
    "falls back to VLLM_LORA_RESOLVER_CACHE_DIR",
    "Directory of adapter folders (for example a shared mount).",
)
MAX_RANK = Variable(
    "VLLM_LORA_RESOLVER_MAX_RANK",
    "`--max-lora-rank` from the server command line, else 16",
    "Largest LoRA rank accepted.",
)
BASE_MODEL_ALIASES = Variable(
    "VLLM_LORA_RESOLVER_BASE_MODEL_ALIASES",
    "none",
    "Comma list of names also accepted as the adapter's base model.",
)
CACHE_MAX_BYTES = Variable(
    "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES",
    "unlimited",
    "LRU cap of the cache: `20GiB`, `500MB` or a number of bytes.",
)
MAX_ADAPTER_BYTES = Variable(
    "VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES",
    "16GiB",
    "Largest adapter (config and weights) fetched; a larger one is refused before any download.",
)
NEGATIVE_TTL = Variable(
    "VLLM_LORA_RESOLVER_NEGATIVE_TTL",
    "30",
    "Seconds a missing adapter name is remembered as missing.",
)
SERVE_STALE = Variable(
    "VLLM_LORA_RESOLVER_SERVE_STALE",
    "unreachable",
    "When cached copies of a store's adapters are served while it cannot answer: "
    "`unreachable` (not when it refuses), `always`, or `never`.",
)
STORE_DOWN = Variable(
    "VLLM_LORA_RESOLVER_STORE_DOWN",
    "next",
    "A store that cannot answer, with nothing cached to serve: `next` tries the next resolver, "
    "`fail` fails the request.",
)
TRUST = Variable(
    "VLLM_LORA_RESOLVER_TRUST",
    "unset: adapters are served without a signature check",
    "Comma list of the signers whose adapters are served, and only theirs: `key:PATH` (a PEM "
    "public key), `certificate:PATH` (PEM certificates of the CA issuing signing certificates), "
    "`sigstore:identity=ID;issuer=URL;trust_config=PATH` (keyless, offline root).",
)
VLLM_PLUGINS = Variable(
    "VLLM_PLUGINS",
    "unset: every plugin, in the fixed order of `configured.DEFAULT_ORDER`",
    "vLLM's own list of plugins to load; its order is the order resolvers are tried in.",
)

#: The variables of the pipeline and the plugins, after the cache root and the stores' own
#: (`vllm_lora_resolvers.stores.ALL_VARIABLES` lists them all).
PIPELINE_VARIABLES: tuple[Variable, ...] = (
    MAX_RANK,
    BASE_MODEL_ALIASES,
    CACHE_MAX_BYTES,
    MAX_ADAPTER_BYTES,
    NEGATIVE_TTL,
    SERVE_STALE,
    STORE_DOWN,
    TRUST,
    VLLM_PLUGINS,
)

DEFAULT_MAX_RANK = 16
# A rank-64 LoRA of every linear layer of a 405B model is about 8 GiB in float32.
DEFAULT_MAX_ADAPTER_BYTES = 16 << 30
DEFAULT_NEGATIVE_TTL_SECONDS = 30.0

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_byte_size(text: str, variable: str = CACHE_MAX_BYTES.name) -> int:
    """Parse ``20GiB``, ``500MB``, ``1.5GB`` or a plain byte count.

    >>> parse_byte_size("2KiB")
    2048
    """
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigurationError(
            f"{variable}={text!r} is not a size; use a byte count or a unit such as 500MB or 20GiB"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def max_rank_from_argv(argv: Sequence[str]) -> int | None:
    """The value of ``--max-lora-rank`` on a vLLM server command line, if given."""
    for index, argument in enumerate(argv):
        if argument.startswith("--max-lora-rank="):
            value = argument.split("=", 1)[1]
        elif argument in ("--max-lora-rank", "--max_lora_rank") and index + 1 < len(argv):
            value = argv[index + 1]
        else:
            continue
        if value.isdigit():
            return int(value)
    return None


#: The forms of a `TRUST` entry: ``KIND:VALUE``.
TRUST_KINDS = ("key", "certificate", "sigstore")
_SIGSTORE_FIELDS = ("identity", "issuer", "trust_config")


@dataclass(frozen=True)
class TrustedSigner:
    """One entry of ``VLLM_LORA_RESOLVER_TRUST``, as written (its files are read when a resolver
    starts: `vllm_lora_resolvers.signing.load_trust`).

    ``key:PATH``: signatures made with the private key of the PEM public key ``PATH``.
    ``certificate:PATH``: signatures whose signing certificate chains up to one of the PEM
    certificates in ``PATH`` (the CA certificates, as ``model_signing verify certificate
    --certificate_chain`` takes them). ``sigstore:identity=ID;issuer=URL;trust_config=PATH``:
    keyless Sigstore signatures by the identity ``ID`` (an e-mail address, a CI workflow's URI)
    whose OIDC issuer is ``URL``, checked against the Sigstore trust root ``PATH`` (a client
    trust configuration, as ``model_signing verify sigstore --trust_config`` takes it).
    """

    kind: str
    path: Path
    identity: str = ""
    issuer: str = ""

    def __str__(self) -> str:
        if self.kind == "sigstore":
            return (
                f"sigstore:identity={self.identity};issuer={self.issuer};trust_config={self.path}"
            )
        return f"{self.kind}:{self.path}"


def parse_trust(text: str) -> tuple[TrustedSigner, ...]:
    """The entries of ``VLLM_LORA_RESOLVER_TRUST`` (``""``: none).

    >>> parse_trust("key:/etc/keys/release.pub")
    (TrustedSigner(kind='key', path=PosixPath('/etc/keys/release.pub'), identity='', issuer=''),)
    """
    return tuple(_trusted_signer(entry) for entry in comma_list(text))


def _trusted_signer(entry: str) -> TrustedSigner:
    kind, colon, value = entry.partition(":")
    value = value.strip()
    if not colon or kind not in TRUST_KINDS or not value:
        raise ConfigurationError(
            f"{TRUST.name}: {entry[:200]!r} is not key:PATH, certificate:PATH or "
            "sigstore:identity=ID;issuer=URL;trust_config=PATH"
        )
    if kind != "sigstore":
        return TrustedSigner(kind, Path(value))
    fields = dict(part.strip().partition("=")[::2] for part in value.split(";") if part.strip())
    missing = [name for name in _SIGSTORE_FIELDS if not fields.get(name, "").strip()]
    unknown = sorted(set(fields) - set(_SIGSTORE_FIELDS))
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(unknown)}"
        raise ConfigurationError(
            f"{TRUST.name}: {entry[:200]!r} {problem}; write "
            "sigstore:identity=ID;issuer=URL;trust_config=PATH, PATH a Sigstore trust root "
            "mounted on the server (keyless signatures are checked offline)"
        )
    return TrustedSigner(
        kind,
        Path(fields["trust_config"].strip()),
        identity=fields["identity"].strip(),
        issuer=fields["issuer"].strip(),
    )


def comma_list(text: str | None) -> tuple[str, ...]:
    """The stripped, non-empty items of a comma list."""
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _positive_int(environ: Mapping[str, str], variable: Variable) -> int | None:
    text = environ.get(variable.name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigurationError(f"{variable.name}={text!r} must be a positive whole number")
    return int(text)


def _seconds(environ: Mapping[str, str], variable: Variable, default: float) -> float:
    text = environ.get(variable.name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigurationError(f"{variable.name}={text!r} must be a number of seconds >= 0")
    return value


def _choice(environ: Mapping[str, str], variable: Variable, choices: tuple[str, ...]) -> str:
    """The variable's value, one of ``choices`` (the first is the default)."""
    text = environ.get(variable.name, "").strip().lower() or choices[0]
    if text not in choices:
        raise ConfigurationError(
            f"{variable.name}={text!r} must be one of {', '.join(repr(c) for c in choices)}"
        )
    return text


@dataclass(frozen=True)
class Settings:
    """The resolvers' configuration, read once from the environment."""

    cache_dir: Path | None
    max_rank: int
    base_model_aliases: tuple[str, ...]
    cache_max_bytes: int | None
    max_adapter_bytes: int
    negative_ttl_seconds: float
    serve_stale: str
    store_down: str
    plugin_order: tuple[str, ...] | None
    #: The signers whose adapters are served, and only theirs (``()``: no signature is checked).
    trust: tuple[TrustedSigner, ...] = ()
    #: Whether stores list adapters' signatures even when ``trust`` is empty (not a variable:
    #: ``vllm-lora validate`` sets it to show who signed).
    read_signatures: bool = False
    #: The environment the settings were read from, for `value`: each store reads its own
    #: variable there (`StoreDeclaration.source`). Not compared, not shown.
    environ: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
    ) -> Settings:
        """Read every variable; raise `ConfigurationError` for a value that is set but unusable."""
        env = os.environ if environ is None else environ
        cache_dir = env.get(CACHE_DIR.name, "").strip()
        max_bytes = env.get(CACHE_MAX_BYTES.name, "").strip()
        max_adapter = env.get(MAX_ADAPTER_BYTES.name, "").strip()
        plugins = env.get(VLLM_PLUGINS.name)
        max_rank = _positive_int(env, MAX_RANK) or max_rank_from_argv(
            sys.argv if argv is None else argv
        )
        return cls(
            cache_dir=Path(cache_dir) if cache_dir else None,
            max_rank=max_rank or DEFAULT_MAX_RANK,
            base_model_aliases=comma_list(env.get(BASE_MODEL_ALIASES.name)),
            cache_max_bytes=parse_byte_size(max_bytes) if max_bytes else None,
            max_adapter_bytes=(
                parse_byte_size(max_adapter, MAX_ADAPTER_BYTES.name)
                if max_adapter
                else DEFAULT_MAX_ADAPTER_BYTES
            ),
            negative_ttl_seconds=_seconds(env, NEGATIVE_TTL, DEFAULT_NEGATIVE_TTL_SECONDS),
            serve_stale=_choice(env, SERVE_STALE, ("unreachable", "always", "never")),
            store_down=_choice(env, STORE_DOWN, ("next", "fail")),
            # vLLM splits VLLM_PLUGINS on "," without stripping; so do we.
            plugin_order=tuple(plugins.split(",")) if plugins is not None else None,
            trust=parse_trust(env.get(TRUST.name, "")),
            environ=dict(env),
        )

    @property
    def lists_signatures(self) -> bool:
        """Whether lookups look for an adapter's signature beside its files."""
        return bool(self.trust) or self.read_signatures

    def value(self, variable: Variable) -> str:
        """The stripped value of ``variable`` in the environment these settings were read from
        (``""`` when unset): how a store reads the variable that turns it on, and another
        package's plugin a variable of its own."""
        return self.environ.get(variable.name, "").strip()

    def require_cache_dir(self, for_what: str) -> Path:
        """The cache root, or a `ConfigurationError` saying it must be set for ``for_what``."""
        if self.cache_dir is None:
            raise ConfigurationError(
                f"{CACHE_DIR.name} must be set to a writable node-local directory "
                f"for {for_what} to cache adapters"
            )
        return self.cache_dir


def install_hint(extra: str) -> str:
    """The command that installs this package's extra ``extra``: its requirements, as the
    installed package declares them (the package itself is on no index yet). An install that
    does not declare the extra (one older than it, or none: a source tree on the path) is told to
    reinstall the package with it."""
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    try:
        declared = metadata.requires("vllm-lora-resolvers") or []
    except metadata.PackageNotFoundError:
        declared = []
    requirements = [
        f"'{line.split(';', 1)[0].strip()}'" for line in declared if marker.search(line)
    ]
    if not requirements:
        return (
            f"reinstall vllm-lora-resolvers with its [{extra}] extra (pip install "
            f"'.[{extra}]' in its source folder): the installed one does not declare it"
        )
    return f"pip install {' '.join(requirements)} (the [{extra}] extra)"
