"""User-facing errors: each is a request or configuration problem with a message that says what
was wrong. The CLI prints them; the services answer them with INVALID_ARGUMENT."""


def shorten(text: str, limit: int = 120) -> str:
    """What an error message or a log line may echo of a client's input: at most about `limit`
    characters (head and tail of a longer text), control characters escaped."""
    if len(text) > limit:
        text = f"{text[: limit // 2]}...[{len(text) - limit // 2 - limit // 4} characters cut]...{text[-(limit // 4):]}"
    return "".join(c if c.isprintable() else repr(c)[1:-1][:6] for c in text)


class UserError(ValueError):
    """Base class: bad input, not a bug."""


class ConfigError(UserError):
    """A configuration value is out of range; the message names the field and the allowed range."""


class MediaError(UserError):
    """An image or video is unreadable, empty, or over a limit."""


class PromptError(UserError):
    """The prompt is empty, too long, or its media placeholders do not match the media."""


class WireError(UserError):
    """A received tensor does not match its schema; the message says how."""


class ModelLoadError(UserError):
    """The checkpoint directory is missing, of an unsupported family, or lacks tensors."""
