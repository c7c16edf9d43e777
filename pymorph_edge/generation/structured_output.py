"""JSON mode and tool calls: the request's response_format / tools / tool_choice turned into a grammar, and the
answer into tool_calls. Every piece is llama-cpp-python's own (its JSON-schema converter, its JSON grammar and its
completion-to-tool-call conversion), chosen exactly as its default chat handler chooses them, so an app gets the
same constrained output here; the grammar then runs in the same llama.cpp sampler chain as the rest."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_chat_format as lcf
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

logger = logging.getLogger(__name__)


@dataclass
class Structure:
    """What a chat request constrains: the grammar (None: free text) and, for a forced tool call, its name."""

    grammar: LlamaGrammar | str | None = None
    tool_name: str | None = None
    tools: list[dict[str, Any]] | None = None  # shown to the chat template
    tool_choice: Any = None


def _schema_grammar(schema: Any, what: str) -> LlamaGrammar:
    """llama_cpp's converter, falling back to any JSON as its chat handler does (logged here, not silent)."""
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # the converter raises plain Exceptions on schemas it cannot express
        logger.warning(
            "%s: the JSON schema could not become a grammar (%s); the answer is constrained to JSON", what, exc
        )
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


def response_format_grammar(response_format: Any) -> LlamaGrammar | None:
    """The grammar for OpenAI's response_format: {"type": "text"}, {"type": "json_object"} (optionally with a
    llama_cpp-style "schema"), or {"type": "json_schema", "json_schema": {"schema": ...}}. ValueError otherwise."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError(f"response_format must be a dict with a 'type', got {response_format!r:.100}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return lcf._grammar_for_response_format(response_format, verbose=False)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return _schema_grammar(spec["schema"], "response_format")
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return tools


def structure(
    response_format: Any = None,
    tools: Any = None,
    tool_choice: Any = None,
    functions: Sequence[dict[str, Any]] | None = None,
    function_call: Any = None,
    grammar: LlamaGrammar | str | None = None,
) -> Structure:
    """What a chat request asks for, resolved as llama_cpp's default chat handler does: legacy functions become
    tools, a named tool_choice forces that tool's arguments through its schema's grammar, response_format a JSON
    grammar; a grammar given outright is used when neither applies."""
    if functions is not None:
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call is not None:
        if function_call in ("none", "auto"):
            tool_choice = function_call
        elif isinstance(function_call, dict) and "name" in function_call:
            tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    tools = _check_tools(tools)
    if tool_choice not in (None, "none", "auto", "required") and not (
        isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict)
    ):
        raise ValueError(
            f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
            f"got {tool_choice!r:.100}"
        )
    out = Structure(grammar=grammar, tools=tools, tool_choice=tool_choice)
    fmt = response_format_grammar(response_format)
    if fmt is not None:
        out.grammar = fmt
    if isinstance(tool_choice, dict):
        if tools is None:
            raise ValueError("tool_choice names a function but no tools were given")
        name = tool_choice["function"].get("name")
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise ValueError(f"tool_choice {name!r} is not one of the tools: {[t['function']['name'] for t in tools]}")
        out.grammar = _schema_grammar(tool["function"].get("parameters", {}), f"tool {name!r}")
        out.tool_name = name
    elif tool_choice == "required" and tools:
        if len(tools) != 1:
            raise ValueError("tool_choice='required' with several tools: name the one to call in tool_choice")
        tool = tools[0]
        out.grammar = _schema_grammar(tool["function"].get("parameters", {}), f"tool {tool['function']['name']!r}")
        out.tool_name = tool["function"]["name"]
    return out


def as_tool_call(tool_name: str, completion_or_chunks: Any, stream: bool) -> Any:
    """A completion whose text is a tool's arguments, as llama_cpp's chat response with tool_calls."""
    return lcf._convert_completion_to_chat_function(tool_name, completion_or_chunks, stream)


def chat_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Completion logprobs in the chat shape ({"content": [{token, logprob, top_logprobs}]}), llama_cpp's own."""
    return lcf._convert_text_completion_logprobs_to_chat(logprobs)
