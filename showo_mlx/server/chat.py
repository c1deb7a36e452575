"""Chat messages → what Show-o answers.

Show-o's instruction tuning (LLaVA data through the `phi1.5` conversation template of
`llava/llava/conversation.py`) saw conversations as

    USER: q1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT:

and the official demo (`inference_mmu.py`) asks one question as `USER: \\n{q} ASSISTANT:` after the
image. So a conversation with an image goes to `Pipeline.stream_ask` with everything between the
demo's first `USER: \\n` and its final ` ASSISTANT:` as the question: one question is exactly
`showo ask`, a longer history continues in the template's form. Without an image, a single user
message is continued as plain text (exactly `showo complete`); a longer conversation is rendered
with the template and continued.

System (and developer) messages have no place in Show-o's format: their text is put before the
first user turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

from .errors import bad_request
from .schemas import Message

USER, ASSISTANT, END = "USER: ", "ASSISTANT:", "<|endoftext|>"


@dataclass
class ChatPrompt:
    text: str  # the question (with an image) or the text to continue (without)
    image: Image.Image | None = None


def message_parts(message: Message, index: int):
    """(text, images) of one message; parts' texts are joined with newlines."""
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for j, part in enumerate(content):
        param = f"messages[{index}].content[{j}]"
        if part.type == "text":
            if part.text is None:
                raise bad_request("a text part needs 'text'", param)
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise bad_request("an image_url part needs 'image_url': {'url': ...}", param)
            if message.role != "user":
                raise bad_request("images are only read from user messages", param)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append((url, f"{param}.image_url"))
    return "\n".join(texts), images


def build_prompt(messages: list[Message], read_image: Callable[[str, str], Image.Image]) -> ChatPrompt:
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    image_refs = []
    for i, message in enumerate(messages):
        text, images = message_parts(message, i)
        image_refs += images
        if message.role in ("system", "developer"):
            if text:
                system.append(text)
        else:
            turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise bad_request("the last message must be the user's (Show-o answers the user)", "messages")
    if len(image_refs) > 1:
        raise bad_request(f"{len(image_refs)} images in the conversation; Show-o reads one image", image_refs[1][1])
    image = read_image(*image_refs[0]) if image_refs else None
    if system:  # before the first user turn's text
        k = next(i for i, (role, _) in enumerate(turns) if role == "user")
        turns[k] = ("user", "\n".join(system + [turns[k][1]]))
    if image is None and len(turns) == 1:
        if not turns[0][1]:
            raise bad_request("the message is empty; nothing to continue", "messages")
        return ChatPrompt(turns[0][1])
    rendered = render(turns)
    if image is None:
        return ChatPrompt(rendered)
    # Cut the demo's frame off: stream_ask puts "USER: \n" before and " ASSISTANT:" after.
    question = rendered[len(USER):-len(" " + ASSISTANT)] if rendered.startswith(USER) else rendered[: -len(" " + ASSISTANT)]
    return ChatPrompt(question, image)


def render(turns: list[tuple[str, str]]) -> str:
    """The phi1.5 template (sep " ", sep2 <|endoftext|>), ending with an open assistant turn."""
    out = ""
    for role, text in turns:
        if role == "user":
            out += f"{USER}{text} "
        else:
            out += f"{ASSISTANT} {text}{END}"
    return (out + ASSISTANT).strip()
