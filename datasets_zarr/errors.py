"""Errors raised by the conversion pipeline, each naming the file at fault and what to do."""

from __future__ import annotations


class ConversionError(ValueError):
    """A scan (or the arguments describing it) cannot be converted.

    The message names the file or volume, says what is wrong and what to do about it.
    """

    def __init__(self, message: str, *, path: str | None = None, volume_id: str | None = None):
        super().__init__(message)
        self.path = path
        self.volume_id = volume_id


class ConversionFailed(ConversionError):
    """Some volumes of a conversion run failed; the others were converted and are in the manifest.

    `failures` lists one dict per failed volume (`id`, `source`, `error`); `manifest` is the store's
    manifest after the run (the successfully converted and skipped volumes).
    """

    def __init__(self, failures: list[dict], manifest=None):
        lines = [f"{len(failures)} volume(s) failed to convert (the others were converted):"]
        lines += [f"  - {f['id']} ({f['source']}): {f['error']}" for f in failures]
        lines.append("Fix or remove these inputs and run the conversion again: converted volumes are "
                      "skipped, so only the failed ones are redone. Pass on_error='skip' to accept "
                      "the partial store without an exception.")
        super().__init__("\n".join(lines))
        self.failures = failures
        self.manifest = manifest
