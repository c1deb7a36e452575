"""Request bodies of the OpenAI API as far as Show-o can serve them, plus Show-o's own fields.

JSON bodies are validated strictly (a string where a number belongs is an error, as at OpenAI);
multipart forms, whose values are all strings, are converted first (`edit_request_from_form`).
Fields this server does not use (`user`, `quality`, penalties, ...) are accepted and ignored so that
ordinary clients work unchanged."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_IMAGES = 8  # `n`: OpenAI's dall-e-2 range is 1..10; Show-o decodes in batches, 8 keeps memory modest
MAX_STEPS = 1000  # a bound on one request's work; the reference uses 16..50
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -- chat ------------------------------------------------------------------------------------------
class ImageURL(_Strict):
    url: str
    detail: Optional[str] = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[ContentPart]]] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    seed: Optional[int] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    strict: bool = False  # Show-o: refuse instead of shortening an answer that would overrun the context


# -- images ----------------------------------------------------------------------------------------
class _ImageFields(BaseModel):
    """What generations and edits share: OpenAI's fields and Show-o's MaskGIT settings."""

    prompt: str
    model: Optional[str] = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: Optional[str] = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Optional[Literal["png"]] = None
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES)
    # Show-o fields (defaults: the model's, as the CLI's)
    steps: Optional[int] = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: Optional[float] = Field(default=None, ge=0)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**31)
    schedule: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0)
    greedy: bool = False
    top_k: Optional[int] = Field(default=None, ge=1)
    strict: bool = False  # refuse a prompt over the 126-token limit instead of truncating it


class ImageGenerationRequest(_ImageFields):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageEditRequest(_ImageFields):
    """Multipart: values arrive as strings, so conversion is lax here."""

    model_config = ConfigDict(strict=False, extra="ignore")
    direction: Optional[list[Literal["left", "right", "up", "down"]]] = None
    offset: int = Field(default=0, ge=0)


def edit_request_from_form(fields: dict[str, list[str]]) -> dict:
    """Form fields (name → every value sent) → a dict for `ImageEditRequest`. `direction` may be
    repeated or comma-separated; other fields take their single value."""
    out: dict = {}
    for name, values in fields.items():
        key = name[:-2] if name.endswith("[]") else name
        if key == "direction":
            out[key] = [d.strip().lower() for v in values for d in v.split(",") if d.strip()]
        else:
            out[key] = values[-1]
    return out
