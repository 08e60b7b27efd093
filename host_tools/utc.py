# Unix seconds as the ISO 8601 UTC text every host output uses (sinks' JSON, `citynode decode`,
# `citynode monitor --json`): "2023-11-14T22:13:20.250Z".

import datetime


def iso_utc(ts):
    """Unix seconds -> "2023-11-14T22:13:20.250Z" (milliseconds). ValueError if no date (years
    1..9999) has that time: datetime raises OverflowError, ValueError or OSError, by platform
    and value."""
    try:
        dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        raise ValueError("not a date in years 1..9999") from None
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
