"""Grammar-constrained answers with xgrammar: JSON response formats and forced tool calls.

``Grammars`` belongs to one engine (one tokenizer). ``Grammars.matcher`` runs at prepare time in the request's
worker thread, before any media work: it compiles the request's grammar (xgrammar's compiler caches compiled
grammars by their schema, bounded by ``CACHE_BYTES``) and returns a fresh ``GrammarMatcher`` for the row, or
None when the request is unconstrained. A schema the compiler rejects raises ``InvalidSchema`` naming the
parameter.

Compiling is bounded: ``schema_limits.check_schema`` refuses schemas whose patterns ask for costly
repetition first; the compile itself runs in this engine's own ``COMPILE_THREADS`` threads with a deadline
(``GRAMMAR_COMPILE_SECONDS``): one that runs past it is refused (400, "too complex"; the schema is remembered
and refused at once from then on, though the compile it started finishes in the background: xgrammar has
no way to stop one); one that could not even start before the deadline (the threads busy) is 429.

What is constrained (the answer only: the scheduler applies the mask once the row left its reasoning):

- ``response_format: json_object``: a JSON object; ``json_schema``: JSON matching the schema (strict: no
  properties beyond the schema's);
- ``tool_choice: required`` / a named function: one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`` block whose arguments match the function's parameters (any of the tools for ``required``).

Whitespace inside JSON is not free (``any_whitespace=False``): with flexible whitespace a model with weak
preferences can emit blanks forever. When the grammar is complete only the end-of-sequence tokens remain.

``apply_bitmask`` masks one row of logits with a row of xgrammar's packed bitmask (bit j of word w allows
token 32*w + j): for the usual sparse masks it keeps the few allowed values and fills the row with -inf,
for dense ones it writes -inf at the few disallowed ids; both much cheaper on CPU than a full unpacking.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from services.model.engine.schema_limits import check_schema
from services.protocol.errors import InvalidRequest, InvalidSchema, Overloaded
from services.protocol.generate import GenerateRequest, Tool

CACHE_BYTES = 64 * 1024 * 1024
COMPILE_THREADS = 2  # compiles at once, per engine (apart from the prepare threads: media work)
TOO_SLOW_KEPT = 1024  # schemas remembered as too slow to compile (least recently seen out first)
_BITS = np.arange(32, dtype=np.int64)
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[17:40:41] /path/file.cc:5088: "
_CHECK_FAILED = re.compile(r"^Check failed: \(.*?\) is false:\s*")  # the C++ assertion, before its text


class Grammars:
    """xgrammar's tokenizer info and compiler for one tokenizer, built on first use (about a second)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], compile_seconds: float = 5.0
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop = stop_token_ids
        self.compile_seconds = compile_seconds
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._too_slow: OrderedDict[str, None] = OrderedDict()

    def compiler(self) -> Any:
        """The shared ``GrammarCompiler`` (thread-safe; built once)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def matcher(self, request: GenerateRequest) -> Any | None:
        """A new ``GrammarMatcher`` for the request's answer, or None when it is unconstrained.

        Raises:
            InvalidSchema: the compiler rejects a schema (the message names ``response_format`` or
                ``tools[i].function.parameters``).
        """
        if not request.structured():
            return None
        import xgrammar as xgr

        return xgr.GrammarMatcher(self._compile(request))

    def matchers(self, request: GenerateRequest) -> Any | None:
        """What ``Prepared.grammar`` holds: ``matcher``'s result for ``n`` = 1; for ``n`` > 1 a list of
        ``n`` matchers of ONE compiled grammar (a matcher has state: one per choice), or None.

        Raises:
            InvalidSchema: as ``matcher``.
        """
        n = request.sampling.n
        if n == 1 or not request.structured():
            return self.matcher(request)
        import xgrammar as xgr

        compiled = self._compile(request)
        return [xgr.GrammarMatcher(compiled) for _ in range(n)]

    def _compile(self, request: GenerateRequest) -> Any:
        rf = request.response_format
        if forces_tools(request):
            chosen = chosen_tools(request)
            for i, tool in chosen:
                check_schema(tool.function.parameters or {}, f"tools[{i}].function.parameters")
            param = grammar_param(request)
            key = json.dumps([[i, t.function.model_dump()] for i, t in chosen], sort_keys=True)
            compiler = self.compiler()  # built outside the deadline (once, about a second)
            return self._bounded(
                "tools:" + key, param, lambda: compiler.compile_grammar(tool_call_grammar(request))
            )
        assert rf is not None
        with_schema = rf.type == "json_schema" and rf.json_schema is not None
        schema = rf.json_schema if with_schema else {"type": "object"}
        check_schema(schema, "response_format")
        text = json.dumps(schema)
        compiler = self.compiler()
        # strict: a schema's objects get no properties beyond the schema's; any object for json_object
        return self._bounded(
            f"format:{with_schema}:{text}",
            "response_format",
            lambda: compiler.compile_json_schema(text, any_whitespace=False, strict_mode=with_schema),
        )

    def _bounded(self, key: str, param: str, compile_: Callable[[], Any]) -> Any:
        """``compile_()`` in the compile threads within ``compile_seconds``.

        Raises:
            InvalidSchema: the compiler rejects the schema, or the compile ran past the deadline (now or
                an earlier time: ``key`` is remembered).
            Overloaded: the compile threads were busy until the deadline (the compile never started).
        """
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        too_slow = (
            f"{param}: the JSON schema is too complex (compiling it takes over {self.compile_seconds:g} s)"
        )
        with self._lock:
            if digest in self._too_slow:
                self._too_slow.move_to_end(digest)
                raise InvalidSchema(too_slow)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, "grammar-compile")
            future = self._pool.submit(_guarded, compile_, param)
        try:
            return future.result(timeout=self.compile_seconds)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise Overloaded("too many JSON schemas are being compiled; retry later") from None
            with self._lock:
                self._too_slow[digest] = None
                while len(self._too_slow) > TOO_SLOW_KEPT:
                    self._too_slow.popitem(last=False)
            raise InvalidSchema(too_slow) from None

    def close(self) -> None:
        """Stop the compile threads (compiles queued are dropped; one running finishes on its own)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def _guarded(compile_: Callable[[], Any], param: str) -> Any:
    """``compile_()``; any error but ``InvalidRequest`` becomes ``InvalidSchema`` naming ``param``."""
    try:
        return compile_()
    except InvalidRequest:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors
        raise InvalidSchema(f"{param}: the JSON schema cannot be used: {_clean(exc)}") from None


def chosen_tools(request: GenerateRequest) -> list[tuple[int, Tool]]:
    """(index, tool) of the tools a forced call may use: all for ``required``, the named one for
    ``function``.

    Raises:
        InvalidRequest: the named function is not one of ``tools``.
    """
    chosen = [
        (i, t)
        for i, t in enumerate(request.tools)
        if request.tool_choice.mode == "required" or t.function.name == request.tool_choice.name
    ]
    if not chosen:
        raise InvalidRequest("`tool_choice` names no function of `tools`")
    return chosen


def tool_call_grammar(request: GenerateRequest) -> Any:
    """The grammar of one forced call: ``<tool_call>\\n`` + ``{"name": N, "arguments": A}``
    + ``\\n</tool_call>``
    where N is the named function (``function``) or any tool (``required``) and A matches its parameters.

    Raises:
        InvalidSchema: a tool's parameters cannot be compiled (naming ``tools[i].function.parameters``).
    """
    import xgrammar as xgr

    calls = [_call_grammar(i, tool) for i, tool in chosen_tools(request)]
    body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    head = xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"')
    tail = xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"')
    return xgr.Grammar.concat(head, body, tail)


def _call_grammar(index: int, tool: Tool) -> Any:
    import xgrammar as xgr

    params = tool.function.parameters or {"type": "object", "properties": {}}
    schema = {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as exc:
        raise InvalidSchema(
            f"tools[{index}].function.parameters: the JSON schema cannot be used: {_clean(exc)}"
        ) from None


def _clean(exc: BaseException) -> str:
    """The compiler's message without its log prefix (time, source file) and its failed C++ assertion
    ("Check failed: (val <= MAX_INT64_AS_DOUBLE) is false: "), on one line, bounded."""
    text = " ".join(str(exc).split())
    return _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", text))[:300] or type(exc).__name__


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 (rows, ceil(vocab/32)) bitmask buffer for ``GrammarMatcher.fill_next_token_bitmask``."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmasks(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask ``logits`` (B, V) in place at ``rows`` with the same rows of ``bitmask``.

    CPU: the rows are classified by their masks and handled together, a few vectorised operations per
    kind whatever the number of rows: sparse rows (a quarter of the words or fewer allow anything) keep
    their allowed values and are filled with -inf; dense rows (a quarter or fewer disallow anything) get
    -inf written at their disallowed ids; the rest are unpacked row by row. An accelerator: xgrammar's
    kernel."""
    if logits.device.type != "cpu":
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        return
    words = bitmask.numpy()[rows]
    width = words.shape[1]
    sparse = np.count_nonzero(words, axis=1) * 4 <= width
    dense = ~sparse & (np.count_nonzero(words != -1, axis=1) * 4 <= width)
    index = np.asarray(rows, dtype=np.int64)
    if sparse.any():
        at, ids = _set_bits(words[sparse], index[sparse], logits.shape[1])
        kept = logits[at, ids]
        logits.index_fill_(0, torch.from_numpy(index[sparse]), float("-inf"))
        logits[at, ids] = kept
    if dense.any():
        at, ids = _set_bits(~words[dense], index[dense], logits.shape[1])
        logits[at, ids] = float("-inf")
    for k in np.flatnonzero(~sparse & ~dense):
        apply_bitmask(logits[int(index[k])], words[k])


def pick_greedy(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]
) -> tuple[dict[int, int], list[int]]:
    """The greedy token of each of ``rows`` whose mask is sparse, picked among its allowed ids only (the
    argmax of the masked row, ties to the lowest id like ``argmax``), without writing the row; and the
    rows left to mask. For greedy rows without penalties this saves a full-row write per step."""
    words = bitmask.numpy()[rows]
    sparse = np.count_nonzero(words, axis=1) * 4 <= words.shape[1]
    index = np.asarray(rows, dtype=np.int64)
    rest = [int(r) for r in index[~sparse]]
    if not sparse.any():
        return {}, rest
    sparse_rows = index[sparse]
    local = np.arange(len(sparse_rows), dtype=np.int64)
    seg, ids = _set_bits(words[sparse], local, logits.shape[1])
    at = torch.from_numpy(sparse_rows)[seg]
    values = logits[at, ids].float()
    n = len(sparse_rows)
    top = torch.full((n,), float("-inf")).scatter_reduce_(0, seg, values, "amax")
    first = torch.where(values == top[seg], ids, logits.shape[1])
    token = torch.full((n,), logits.shape[1], dtype=torch.long).scatter_reduce_(0, seg, first, "amin")
    picked = {
        int(row): int(tok)
        for row, tok in zip(sparse_rows, token.tolist(), strict=True)
        if tok < logits.shape[1]
    }
    rest += [int(r) for r in index[sparse] if int(r) not in picked]  # nothing allowed: let the mask say so
    return picked, rest


def _set_bits(words: np.ndarray, rows: np.ndarray, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) of every set bit of ``words`` (n, W), token ids below ``vocab``, as index tensors."""
    r, w = np.nonzero(words != 0)
    bits = np.unpackbits(np.ascontiguousarray(words[r, w]).view(np.uint8), bitorder="little")
    bits = bits.reshape(-1, 32).astype(bool)
    ids = (w[:, None] * 32 + _BITS)[bits]
    at = np.repeat(rows[r], bits.sum(axis=1))
    keep = ids < vocab
    return torch.from_numpy(at[keep]), torch.from_numpy(ids[keep])


def apply_bitmask(row: torch.Tensor, words: np.ndarray) -> None:
    """Set ``row`` (vocab,) to -inf where the packed bitmask ``words`` (int32) disallows the token."""
    vocab = row.shape[0]
    allowed_words = np.flatnonzero(words)
    if len(allowed_words) * 4 <= len(words):  # few allowed: keep them, fill the rest
        ids = _ids(words, allowed_words, vocab)
        ids = ids.to(row.device)
        kept = row.index_select(0, ids)
        row.fill_(float("-inf"))
        row.index_copy_(0, ids, kept)
        return
    partial = np.flatnonzero(words != -1)
    if len(partial) * 4 <= len(words):  # few disallowed: write them
        row.index_fill_(0, _ids(~words, partial, vocab).to(row.device), float("-inf"))
        return
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
    row.masked_fill_(torch.from_numpy(bits).view(torch.bool).logical_not(), float("-inf"))


def _ids(words: np.ndarray, which: np.ndarray, vocab: int) -> torch.Tensor:
    """Token ids of the set bits of ``words[which]``, below ``vocab``."""
    bits = np.unpackbits(words[which].view(np.uint8), bitorder="little").reshape(-1, 32).astype(bool)
    ids = (which[:, None] * 32 + _BITS)[bits]
    return torch.from_numpy(ids[ids < vocab])


def forces_tools(request: GenerateRequest) -> bool:
    """The request's grammar is its forced tool call's (``tool_choice`` required or a named function)."""
    return bool(request.tools) and request.tool_choice.mode in ("required", "function")


def grammar_param(request: GenerateRequest) -> str:
    """The public parameter that a request's grammar comes from (what an error about it names): the one
    forced tool's ``tools[i].function.parameters``, ``tools`` for a choice among several, else
    ``response_format``."""
    if not forces_tools(request):
        return "response_format"
    chosen = chosen_tools(request)
    return f"tools[{chosen[0][0]}].function.parameters" if len(chosen) == 1 else "tools"
