"""Gemma's turn format, for tokenizers that carry no chat template of their own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def gemma_turns(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat messages as `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n`.

    Gemma has no system role: as in Google's own template, a system message is put in front of
    the first user turn.
    """
    parts: list[str] = []
    system = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system += content + "\n\n"
            continue
        turn = "model" if role == "assistant" else "user"
        if turn == "user" and system:
            content, system = system + content, ""
        parts.append(f"<start_of_turn>{turn}\n{content}<end_of_turn>\n")
    return "".join(parts) + "<start_of_turn>model\n"
