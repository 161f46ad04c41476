"""``vllm-lora validate DIR|URI``: lint an adapter before (or after) uploading it."""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.text import Text

from vllm_lora_resolvers import signing
from vllm_lora_resolvers.adapter import CONFIG_FILE, SIGNATURE_FILE
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.cli.lint import (
    CONFIG_CHECK,
    DOWNLOAD_CHECK,
    FILES_CHECK,
    FILES_FIX,
    NAME_CHECK,
    SIGNATURE_CHECK,
    Check,
    LintPolicy,
    LintReport,
    check_name,
    lint_folder,
)
from vllm_lora_resolvers.cli.output import (
    Finding,
    Level,
    cannot_check,
    console,
    line,
    max_rank_option,
    plural,
    print_finding,
    printable,
)
from vllm_lora_resolvers.cli.stores import (
    AdapterUri,
    is_remote,
    naming_stores,
    open_store,
    scratch_cache,
    split_adapter_uri,
)
from vllm_lora_resolvers.config import TRUST, Settings
from vllm_lora_resolvers.errors import IntegrityError, InvalidAdapterError, SignatureError

_NOT_FOUND_FIX = "upload the adapter folder (adapter_config.json and its weights) there"
_SIGNATURE_FIX = (
    f"sign the adapter's folder, named as the adapter, with a key or certificate {TRUST.name} "
    "trusts (vllm-lora publish --sign-key, or model_signing sign), and upload it with its "
    f"{SIGNATURE_FILE}"
)


@naming_stores
@click.command()
@click.argument("target", metavar="DIR|URI")
@click.option("--base-model", help="The server's --model; default: the adapter's own base model.")
@max_rank_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result.")
def validate(target: str, base_model: str | None, max_rank: int | None, as_json: bool) -> None:
    """Check an adapter as the resolvers will: name, config, base model, rank, features, weights.

    DIR is a local adapter folder. URI is a store's URI ({stores}) followed by /NAME, or
    hf://ORG/REPO[/FOLDER][@REVISION]: it is fetched (and its checksums verified) into a
    temporary folder first. NAME is the path below the store its variable configures (e.g.
    VLLM_LORA_RESOLVER_S3_URI) when the URI is under it, else its last segment (with a
    warning). Who signed it (model.sig) is shown, and checked against VLLM_LORA_RESOLVER_TRUST
    when set: then an adapter the server would refuse for its signature is invalid. Exit 0 when
    valid, 1 when not, 2 when it cannot be checked.
    """
    with cannot_check():
        # Stores list model.sig, so that who signed is shown even when TRUST is unset.
        settings = dataclasses.replace(Settings.from_environ(argv=[]), read_signatures=True)
        lint_policy = LintPolicy(
            base_model, max_rank or settings.max_rank, settings.base_model_aliases
        )
        report = (
            _validate_remote(target, lint_policy, settings)
            if is_remote(target)
            else validate_folder(Path(target), lint_policy, settings)
        )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(console(), report)
    sys.exit(0 if report.valid else 1)


def validate_folder(
    folder: Path,
    lint_policy: LintPolicy,
    settings: Settings,
    name: str | None = None,
    *,
    signature: bool = True,
) -> LintReport:
    """Every check ``validate DIR`` makes of the local adapter folder ``folder``; ``name`` is
    the name clients will ask for (default: the folder's own); its signature is not checked
    unless ``signature`` (``publish --sign-key`` signs it afterwards)."""
    if not folder.is_dir():
        raise click.BadParameter(f"{folder} is not a directory", param_hint="DIR|URI")
    real = folder.resolve()
    adapter = name or real.name
    with tempfile.TemporaryDirectory(prefix="vllm-lora-") as scratch:
        resolver = open_store(str(real.parent), settings, NodeCache(Path(scratch)))
        name_check = check_name(adapter, resolver.store.accepts_name(adapter))
        try:
            resolver.lookup(real.name)  # the filesystem resolver's rules for the folder's files
        except InvalidAdapterError as error:
            return _refused(adapter, str(folder), lint_policy, name_check, error)
        served_as = resolver.store.snapshot_name(adapter)
    report = lint_folder(adapter, folder, str(folder), name_check, lint_policy)
    if not signature:
        return report
    return _with_signature(report, folder, served_as, settings)


def _validate_remote(uri: str, lint_policy: LintPolicy, settings: Settings) -> LintReport:
    adapter = split_adapter_uri(uri, settings)
    name = adapter.name
    with scratch_cache(adapter.store) as (cache, scratch):
        resolver = open_store(adapter.store, settings, cache)
        name_check = _remote_name_check(adapter, resolver.store.accepts_name(name))
        if name_check.level is Level.FAIL:
            return LintReport(name, uri, lint_policy, None, (name_check,))
        try:
            remote = resolver.lookup(name)
        except InvalidAdapterError as error:
            return _refused(name, uri, lint_policy, name_check, error)
        if remote is None:
            absent = Check(CONFIG_CHECK, Level.FAIL, f"no {CONFIG_FILE} at {uri}", _NOT_FOUND_FIX)
            return LintReport(name, uri, lint_policy, None, (absent,))
        folder = scratch / "adapter"
        try:
            resolver.fetcher.fetch_to(remote, remote.files, folder)
        except IntegrityError as error:
            damaged = Check(DOWNLOAD_CHECK, Level.FAIL, str(error), "upload the adapter again")
            return LintReport(name, remote.location, lint_policy, None, (damaged,))
        report = lint_folder(name, folder, remote.location, name_check, lint_policy)
        return _with_signature(report, folder, resolver.store.snapshot_name(name), settings)


def _with_signature(
    report: LintReport, folder: Path, served_as: str, settings: Settings
) -> LintReport:
    """``report`` and the signature check of ``folder``, the adapter served as ``served_as``."""
    check = check_signature(report.adapter, folder, served_as, settings)
    return dataclasses.replace(report, checks=(*report.checks, check))


def check_signature(adapter: str, folder: Path, served_as: str, settings: Settings) -> Check:
    """Who signed the adapter in ``folder`` (its ``model.sig``) and, when ``settings`` trust
    signers, whether a server would serve it as ``served_as``: `SignatureError`'s reason if not.
    """
    trust = signing.load_trust(settings)
    path = folder / SIGNATURE_FILE
    if trust is not None:
        try:
            checked = trust.check_folder(adapter, folder, served_as)
        except SignatureError as error:
            return Check(SIGNATURE_CHECK, Level.FAIL, str(error), _SIGNATURE_FIX)
        return Check(
            SIGNATURE_CHECK,
            Level.PASS,
            f"signed by {checked.signer}, as {checked.model_name!r} ({TRUST.name} trusts it)",
        )
    if not path.is_file():
        return Check(
            SIGNATURE_CHECK, Level.SKIP, f"unsigned (no {SIGNATURE_FILE}); {TRUST.name} is unset"
        )
    try:
        who = signing.describe(adapter, path)
    except SignatureError as error:
        return Check(SIGNATURE_CHECK, Level.WARN, str(error), _SIGNATURE_FIX)
    return Check(
        SIGNATURE_CHECK, Level.SKIP, f"signed by {who}; not checked: {TRUST.name} is unset"
    )


def _remote_name_check(adapter: AdapterUri, accepted: bool) -> Check:
    """The name check, a warning when the name is the URI's last segment for want of a store."""
    variable = adapter.guessed_without
    if not accepted or variable is None:
        return check_name(adapter.name, accepted)
    return Check(
        NAME_CHECK,
        Level.WARN,
        f"{adapter.name!r}, taking {adapter.store} as the store (the URI is not below "
        f"{variable.name})",
        f"set {variable.name} to the server's store: the name clients ask for is the path below it",
    )


def _refused(
    name: str, location: str, lint_policy: LintPolicy, name_check: Check, error: Exception
) -> LintReport:
    """The report of an adapter the resolver's lookup refuses before reading any of it."""
    refused = Check(FILES_CHECK, Level.FAIL, str(error), FILES_FIX)
    return LintReport(name, location, lint_policy, None, (name_check, refused))


def print_report(out: Console, report: LintReport) -> None:
    """The report as ``validate`` prints it: the adapter, what it was checked against, each
    check (with the fix of a failure) and the verdict."""
    out.print(Text.assemble((printable(report.adapter), "bold"), printable(f"  {report.location}")))
    if report.base_model_source == CONFIG_FILE:
        out.print(
            line(
                f"  base model: {report.base_model} (the adapter's own base_model_name_or_path; "
                "pass --base-model to check it against your server's --model)"
            )
        )
    elif report.base_model is not None:
        out.print(line(f"  base model: {report.base_model} (--base-model)"))
    out.print(f"  max rank: {report.lint_policy.max_rank}")
    for check in report.checks:
        finding = Finding(check.level, f"{check.check}: {check.detail}", check.fix)
        print_finding(out, finding, indent=2)
    verdict = "valid" if report.valid else f"invalid: {plural(len(report.problems), 'problem')}"
    out.print(Text(verdict, style="bold green" if report.valid else "bold red"))
