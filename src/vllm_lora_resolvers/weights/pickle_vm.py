"""The state dict a ``torch.save`` pickle describes, found by running the pickle on inert values.

vLLM loads ``.bin`` / ``.pt`` adapters with ``torch.load(weights_only=True)``, whose unpickler
(``torch/_weights_only_unpickler.py``) runs a fixed set of protocol-2 opcodes and calls only
allow-listed globals. This machine runs those opcodes with the same stack, marks and memo, over
stand-ins: a global is its name, a storage a `Storage` record, a tensor a `Tensor` record. Nothing
is imported, constructed or called, so what it reports is what an unpickler would really call,
however the pickle pushed the names. It accepts less than torch: only the globals ``torch.save``
writes for a state dict of floating-point tensors, strings of at most `MAX_PICKLE_STRING_BYTES`
(no operand is read before its length is checked), at most `MAX_PICKLE_OPCODES` opcodes.
Protocol-4 opcodes, which torch's weights-only unpickler refuses, are run only to name the global
such a pickle reaches for, then refused.
"""

from __future__ import annotations

import pickletools
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_lora_resolvers.weights import (
    FLOAT_DTYPE_BYTES,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_NAME_CHARS,
    MAX_TENSORS,
    malformed,
    shown_name,
)

# A state dict's pickle takes about 30 opcodes per tensor.
MAX_PICKLE_OPCODES = 1 << 20
MAX_PICKLE_STRING_BYTES = 4 * MAX_TENSOR_NAME_CHARS
# torch.save's typed storages of floating-point tensors, by the dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
}


@dataclass(frozen=True)
class Global:
    """A global as a pickle names it; never imported."""

    module: str
    name: str

    def __str__(self) -> str:
        dotted = f"{self.module}.{self.name}"
        return dotted if re.fullmatch(r"[A-Za-z0-9_.]{1,100}", dotted) else shown_name(dotted)


ORDERED_DICT = Global("collections", "OrderedDict")
REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")
ALLOWED_GLOBALS = frozenset(
    {ORDERED_DICT, REBUILD_TENSOR, REBUILD_PARAMETER, *(Global("torch", s) for s in STORAGE_DTYPES)}
)


@dataclass(frozen=True)
class Storage:
    """A storage the pickle loads from the archive's ``data/<key>`` record."""

    key: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        """The size of its record."""
        return self.numel * FLOAT_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Tensor:
    """A tensor, rebuilt as a view that fits in its storage."""

    storage: Storage
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StateDict:
    """What a pickle loads: tensors by name, and every storage it reads on the way."""

    tensors: dict[str, Tensor]
    storages: dict[str, Storage]


def read_state_dict(pickle: bytes) -> StateDict:
    """The tensors ``pickle`` (a ``data.pkl``) loads; `WeightsError` says what is wrong."""
    machine = _Machine(pickle)
    loaded = machine.run()
    if machine.position != len(pickle):
        raise malformed("its pickle has bytes after its end")
    if machine.beyond_protocol_2:
        raise malformed(
            f"its pickle uses opcode {machine.beyond_protocol_2}, which "
            "torch.load(weights_only=True), the way vLLM loads it, refuses; save it with "
            "torch.save's default protocol or as safetensors"
        )
    if not isinstance(loaded, dict) or not all(
        isinstance(name, str) and isinstance(tensor, Tensor) for name, tensor in loaded.items()
    ):
        raise malformed("its pickle is not a dict of tensors by name")
    if len(loaded) > MAX_TENSORS:
        raise malformed(f"it holds more than {MAX_TENSORS} tensors")
    return StateDict(loaded, machine.storages)


@dataclass
class _Machine:
    data: bytes
    position: int = 0
    stack: list[object] = field(default_factory=list)
    marks: list[list[object]] = field(default_factory=list)
    memo: dict[int, object] = field(default_factory=dict)
    storages: dict[str, Storage] = field(default_factory=dict)
    beyond_protocol_2: str | None = None

    def run(self) -> object:
        for _ in range(MAX_PICKLE_OPCODES):
            code = self.read(1)[0]
            if code == ord("."):  # STOP
                return self.pop()
            handler = _HANDLERS.get(code)
            if handler is None:
                raise malformed(
                    f"its pickle uses opcode {_OPCODE_NAMES.get(code, hex(code))}, which "
                    "torch.save does not write for a state dict"
                )
            handler(self)
        raise malformed(f"its pickle runs more than {MAX_PICKLE_OPCODES} opcodes")

    def read(self, count: int) -> bytes:
        if count > len(self.data) - self.position:
            raise malformed("its pickle is truncated")
        self.position += count
        return self.data[self.position - count : self.position]

    def number(self, layout: str) -> int:
        value: int = struct.unpack(layout, self.read(struct.calcsize(layout)))[0]
        return value

    def text(self, length: int, errors: str = "strict") -> str:
        if length > MAX_PICKLE_STRING_BYTES:
            raise malformed(f"its pickle holds a string longer than {MAX_PICKLE_STRING_BYTES}")
        try:
            return self.read(length).decode("utf-8", errors)
        except UnicodeDecodeError:
            raise malformed("its pickle holds a string that is not UTF-8") from None

    def line(self) -> str:
        end = self.data.find(b"\n", self.position, self.position + MAX_PICKLE_STRING_BYTES)
        if end < 0:
            raise malformed("its pickle names a global without ending the name")
        return self.text(end + 1 - self.position)[:-1]

    def push(self, value: object) -> None:
        self.stack.append(value)

    def pop(self) -> object:
        self.top()
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise malformed("its pickle takes from an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise malformed("its pickle closes a mark it never opened")
        items, self.stack = self.stack, self.marks.pop()
        return items


def _global(machine: _Machine, module: object, name: object) -> None:
    if not isinstance(module, str) or not isinstance(name, str):
        raise malformed("its pickle names a global with something other than strings")
    named = Global(module, name)
    if named not in ALLOWED_GLOBALS:
        raise malformed(f"its pickle calls {named}, which is not allowed")
    machine.push(named)


def _reduce(machine: _Machine) -> None:
    arguments, function = machine.pop(), machine.pop()
    if function == ORDERED_DICT and arguments == ():
        machine.push(OrderedDict())
    elif function == REBUILD_TENSOR and isinstance(arguments, tuple) and len(arguments) == 6:
        machine.push(_rebuilt_tensor(arguments))
    elif function == REBUILD_PARAMETER and isinstance(arguments, tuple) and len(arguments) == 3:
        tensor, requires_grad, hooks = arguments
        if not isinstance(tensor, Tensor) or not isinstance(requires_grad, bool) or hooks != {}:
            raise malformed("its pickle rebuilds a parameter from something else than a tensor")
        machine.push(tensor)
    else:
        raise malformed(f"its pickle calls {function} otherwise than torch.save does")


def _rebuilt_tensor(arguments: tuple[object, ...]) -> Tensor:
    """The tensor ``_rebuild_tensor_v2(*arguments)`` would view in its storage, if it fits."""
    storage, offset, shape, stride, requires_grad, hooks = arguments
    if not (
        isinstance(storage, Storage)
        and _is_count(offset)
        and isinstance(shape, tuple)
        and isinstance(stride, tuple)
        and len(shape) == len(stride) <= MAX_TENSOR_DIMS
        and all(map(_is_count, shape + stride))
        and isinstance(requires_grad, bool)
        and hooks == {}
    ):
        raise malformed("its pickle rebuilds a tensor from arguments torch.save does not write")
    if 0 not in shape:
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
        if last >= storage.numel:
            raise malformed(f"a tensor reaches past the end of its storage {storage.key}")
    return Tensor(storage, shape)


def _persistent_load(machine: _Machine) -> None:
    saved_id = machine.pop()
    if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
        raise malformed("its pickle loads something other than a storage")
    kind, storage_type, key, location, numel = saved_id
    if not (
        kind == "storage"
        and isinstance(storage_type, Global)
        and storage_type.module == "torch"
        and storage_type.name in STORAGE_DTYPES
        and isinstance(key, str)
        and key.isdecimal()
        and isinstance(location, str)
        and _is_count(numel)
    ):
        raise malformed("its pickle loads a storage described otherwise than torch.save does")
    storage = Storage(key, STORAGE_DTYPES[storage_type.name], numel)
    if machine.storages.setdefault(key, storage) != storage:
        raise malformed(f"its pickle describes storage {key} twice, differently")
    machine.push(storage)


def _build(machine: _Machine) -> None:
    # torch.save writes BUILD only to give an OrderedDict state dict its _metadata attribute.
    state, target = machine.pop(), machine.top()
    if type(target) is not OrderedDict or not isinstance(state, dict):
        raise malformed("its pickle sets the state of something other than an OrderedDict")


def _set_items(machine: _Machine, items: list[object]) -> None:
    target = machine.top()
    if not isinstance(target, dict) or len(items) % 2:
        raise malformed("its pickle sets items of something other than a dict")
    for key, value in zip(items[::2], items[1::2], strict=True):
        if not isinstance(key, str | int):
            raise malformed("its pickle uses a dict key other than a string or an integer")
        target[key] = value


def _append(machine: _Machine, items: list[object]) -> None:
    target = machine.top()
    if not isinstance(target, list):
        raise malformed("its pickle appends to something other than a list")
    target.extend(items)


def _memo_get(machine: _Machine, index: int) -> None:
    if index not in machine.memo:
        raise malformed("its pickle reads a memo entry it never wrote")
    machine.push(machine.memo[index])


def _mark(machine: _Machine) -> None:
    machine.marks.append(machine.stack)
    machine.stack = []


def _tuple_of(count: int) -> Callable[[_Machine], None]:
    def run(machine: _Machine) -> None:
        items = [machine.pop() for _ in range(count)]
        machine.push(tuple(reversed(items)))

    return run


def _skip(count: int) -> Callable[[_Machine], None]:
    def run(machine: _Machine) -> None:
        machine.read(count)

    return run


def _beyond_protocol_2(
    opcode: str, handler: Callable[[_Machine], None]
) -> Callable[[_Machine], None]:
    """Run a protocol-4 opcode only to see what the pickle calls; remember it, to refuse it."""

    def run(machine: _Machine) -> None:
        machine.beyond_protocol_2 = machine.beyond_protocol_2 or opcode
        handler(machine)

    return run


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}
# torch's weights-only unpickler's opcodes, minus EMPTY_SET and NEWOBJ (no state dict uses them).
_HANDLERS: dict[int, Callable[[_Machine], None]] = {
    0x80: _skip(1),  # PROTO: any version, as torch
    ord("("): _mark,
    ord("t"): lambda machine: machine.push(tuple(machine.pop_mark())),
    ord(")"): lambda machine: machine.push(()),
    0x85: _tuple_of(1),
    0x86: _tuple_of(2),
    0x87: _tuple_of(3),
    ord("N"): lambda machine: machine.push(None),
    0x88: lambda machine: machine.push(True),
    0x89: lambda machine: machine.push(False),
    ord("]"): lambda machine: machine.push([]),
    ord("}"): lambda machine: machine.push({}),
    ord("J"): lambda machine: machine.push(machine.number("<i")),
    ord("K"): lambda machine: machine.push(machine.number("<B")),
    ord("M"): lambda machine: machine.push(machine.number("<H")),
    0x8A: lambda machine: machine.push(
        int.from_bytes(machine.read(machine.number("<B")), "little", signed=True)
    ),
    ord("G"): lambda machine: machine.push(struct.unpack(">d", machine.read(8))[0]),
    ord("X"): lambda machine: machine.push(machine.text(machine.number("<I"), "surrogatepass")),
    ord("U"): lambda machine: machine.push(machine.text(machine.number("<B"))),
    ord("q"): lambda machine: machine.memo.__setitem__(machine.number("<B"), machine.top()),
    ord("r"): lambda machine: machine.memo.__setitem__(machine.number("<I"), machine.top()),
    ord("h"): lambda machine: _memo_get(machine, machine.number("<B")),
    ord("j"): lambda machine: _memo_get(machine, machine.number("<I")),
    ord("a"): lambda machine: _append(machine, [machine.pop()]),
    ord("e"): lambda machine: _append(machine, machine.pop_mark()),
    ord("s"): lambda machine: _set_items(machine, [*reversed([machine.pop(), machine.pop()])]),
    ord("u"): lambda machine: _set_items(machine, machine.pop_mark()),
    ord("c"): lambda machine: _global(machine, machine.line(), machine.line()),
    ord("R"): _reduce,
    ord("b"): _build,
    ord("Q"): _persistent_load,
    0x95: _beyond_protocol_2("FRAME", _skip(8)),
    0x94: _beyond_protocol_2(
        "MEMOIZE", lambda machine: machine.memo.__setitem__(len(machine.memo), machine.top())
    ),
    0x8C: _beyond_protocol_2(
        "SHORT_BINUNICODE",
        lambda machine: machine.push(machine.text(machine.number("<B"), "surrogatepass")),
    ),
    0x8D: _beyond_protocol_2(
        "BINUNICODE8",
        lambda machine: machine.push(machine.text(machine.number("<Q"), "surrogatepass")),
    ),
    0x93: _beyond_protocol_2(
        "STACK_GLOBAL", lambda machine: _global(machine, *reversed([machine.pop(), machine.pop()]))
    ),
}
