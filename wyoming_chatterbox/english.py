"""How numbers, units, times, money and a few symbols are said in English.

`say_english` rewrites one unit of text (text.py decides what a unit is) so that
the model reads it as a person would: "21°C" -> "21 degrees Celsius", "3:45 pm"
-> "three forty-five PM", "$5.99" -> "5 dollars and 99 cents". Pure functions;
text.py calls it only for English and only when ENGLISH_GATE_RE matches.
"""

from __future__ import annotations

import re

# Two numbers multiplied: "2*3", "4 × 5".
DIGIT_STAR_RE = re.compile(r"(?<=\d)\s?[*×]\s?(?=\d)")

ENGLISH_GATE_RE = re.compile(r"[\d&=$€£]|(?i:vs|approx|e\.\s?g|i\.\s?e)")

_UNITS: dict[str, tuple[str, str]] = {
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"),
    "m/s": ("meter per second", "meters per second"),
    "kWh": ("kilowatt hour", "kilowatt hours"),
    "MWh": ("megawatt hour", "megawatt hours"),
    "Wh": ("watt hour", "watt hours"),
    "kW": ("kilowatt", "kilowatts"),
    "W": ("watt", "watts"),
    "V": ("volt", "volts"),
    "mA": ("milliamp", "milliamps"),
    "A": ("amp", "amps"),
    "Hz": ("hertz", "hertz"),
    "hPa": ("hectopascal", "hectopascals"),
    "mbar": ("millibar", "millibars"),
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "m²": ("square meter", "square meters"),
    "m³": ("cubic meter", "cubic meters"),
    "m": ("meter", "meters"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "kg": ("kilogram", "kilograms"),
    "g": ("gram", "grams"),
    "lbs": ("pound", "pounds"),
    "lb": ("pound", "pounds"),
    "L": ("liter", "liters"),
    "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"),
    "µg/m³": ("microgram per cubic meter", "micrograms per cubic meter"),
    "μg/m³": ("microgram per cubic meter", "micrograms per cubic meter"),
    "ppm": ("part per million", "parts per million"),
    "dB": ("decibel", "decibels"),
    "lx": ("lux", "lux"),
    "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"),
    "TB": ("terabyte", "terabytes"),
    "Mbps": ("megabit per second", "megabits per second"),
    "min": ("minute", "minutes"),
    "sec": ("second", "seconds"),
    "hrs": ("hour", "hours"),
    "hr": ("hour", "hours"),
    "h": ("hour", "hours"),
}
_UNIT_ALT = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
_UNIT_END = r"(?![\w/²³])"
_NUMBER = r"\d+(?:\.\d+)?"

_THOUSANDS_RE = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?!\d|,\d)")
_CURRENCIES: dict[str, tuple[str, str, str, str]] = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "USD": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "GBP": ("pound", "pounds", "penny", "pence"),
}
_MAGNITUDE = r"(?:\s?(thousand|million|billion|trillion)\b)?"
_PER_UNIT = r"(?:\s?/\s?([A-Za-zµμ²³/]+))?"
_MONEY_PREFIX_RE = re.compile(
    rf"(?<![\w.])([$€£])\s?(\d+)(?:\.(\d+))?{_MAGNITUDE}{_PER_UNIT}"
)
_MONEY_SUFFIX_RE = re.compile(
    rf"(?<![\w.])(\d+)(?:\.(\d+))?{_MAGNITUDE}\s?([$€£]|EUR\b|USD\b|GBP\b){_PER_UNIT}"
)
_TIME_RANGE_RE = re.compile(r"(?<=\d:\d\d)\s?[-–]\s?(?=\d{1,2}:\d\d)")
_TIME_12_RE = re.compile(
    r"(?<![\w:.,])(\d{1,2})(?:[:.](\d{2}))?\s?([AaPp])\.?[Mm](?!\w)(?:\.(?=[,;:!?)]))?"
)
_TIME_24_RE = re.compile(r"(?<![\w:.,])(\d{1,2}):(\d{2})(?![\w:]|[.,]\d)")
_RANGE_RE = re.compile(
    rf"(?<![\w.])({_NUMBER})\s?[-–]\s?({_NUMBER})"
    rf"(?=\s?(?:[°℃℉%]|(?:{_UNIT_ALT}){_UNIT_END}))"
)
_MINUS_RE = re.compile(rf"(?<![\w.])[-−–](?={_NUMBER}\s?(?:°|℃|℉))")
_TEMPERATURE_RE = re.compile(
    rf"(?<![\w.])({_NUMBER})\s?(?:°\s?([CcFf])|(℃)|(℉)|°)(?![A-Za-z])"
)
_PERCENT_RE = re.compile(rf"({_NUMBER})\s?%")
_UNIT_RE = re.compile(rf"(?<![\w.])({_NUMBER})\s?({_UNIT_ALT}){_UNIT_END}")

_ENGLISH_WORDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<![\w.])[~≈]\s?(?=\d)"), "about "),
    (re.compile(r"(?<![\w#])#(?=\d)"), "number "),
    (re.compile(r"(?<![\w.])N[or]\.\s?(?=\d)"), "Number "),
    (re.compile(r"(?<![\w.])n[or]\.\s?(?=\d)"), "number "),
    (re.compile(r"(?:<=|≤)\s?(?=\d)"), " at most "),
    (re.compile(r"(?:>=|≥)\s?(?=\d)"), " at least "),
    (re.compile(r"<\s?(?=\d)"), " less than "),
    (re.compile(r">\s?(?=\d)"), " more than "),
    (DIGIT_STAR_RE, " times "),
    (re.compile(r"(?<![=<>!])==?(?!=)"), " equals "),
    (re.compile(r"&"), " and "),
    (re.compile(r"(?<![\w.])e\.\s?g\.(?!\w)"), "for example"),
    (re.compile(r"(?<![\w.])E\.\s?g\.(?!\w)"), "For example"),
    (re.compile(r"(?<![\w.])i\.\s?e\.(?!\w)"), "that is"),
    (re.compile(r"(?<![\w.])I\.\s?e\.(?!\w)"), "That is"),
    (re.compile(r"(?<![\w.])(?:vs|VS|Vs)\.?(?!\w)"), "versus"),
    (re.compile(r"(?<![\w.])approx\.?(?!\w)"), "approximately"),
    (re.compile(r"(?<![\w.])Approx\.?(?!\w)"), "Approximately"),
]

_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}


def _number_words(number: int) -> str:
    """Spell out 0-59 (all that hours and minutes need)."""
    if number < 20:
        return _SMALL_NUMBERS[number]
    tens, ones = divmod(number, 10)
    return _TENS[tens] + ("-" + _SMALL_NUMBERS[ones] if ones else "")


def _say_time(hour: int, minute: int, suffix: str) -> str:
    """``_say_time(3, 45, "PM")`` -> ``"three forty-five PM"``."""
    words = _number_words(hour)
    if minute:
        words += " " + (
            _number_words(minute) if minute >= 10 else "oh " + _number_words(minute)
        )
    elif not suffix:
        words += " o'clock"
    return words + (" " + suffix if suffix else "")


def _time_12(match: re.Match[str]) -> str:
    hour = int(match.group(1))
    minute = int(match.group(2) or 0)
    if not 1 <= hour <= 12 or minute > 59:
        return match.group()
    return _say_time(hour, minute, match.group(3).upper() + "M")


def _time_24(match: re.Match[str]) -> str:
    hour_text = match.group(1)
    hour, minute = int(hour_text), int(match.group(2))
    if hour > 23 or minute > 59:
        return match.group()
    if hour == 0 or hour >= 13 or hour_text.startswith("0"):
        return _say_time(hour % 12 or 12, minute, "AM" if hour < 12 else "PM")
    return _say_time(hour, minute, "")


def _unit_name(unit: str, number: str) -> str:
    singular, plural = _UNITS[unit]
    return singular if number == "1" else plural


def _per_unit(unit: str | None) -> str:
    if not unit:
        return ""
    return " per " + (_UNITS[unit][0] if unit in _UNITS else unit)


def _say_money(
    symbol: str,
    whole: str,
    decimals: str | None,
    magnitude: str | None,
    per: str | None,
) -> str:
    one, many, cent, cents = _CURRENCIES[symbol]
    if magnitude:
        number = whole + ("." + decimals if decimals else "")
        said = f"{number} {magnitude} {many}"
    elif decimals is not None and len(decimals) == 2:
        amount, fraction = int(whole), int(decimals)
        fraction_said = f"{fraction} {cent if fraction == 1 else cents}"
        whole_said = f"{whole} {one if amount == 1 else many}"
        if amount == 0:
            said = fraction_said
        elif fraction == 0:
            said = whole_said
        else:
            said = f"{whole_said} and {fraction_said}"
    else:
        number = whole + ("." + decimals if decimals else "")
        said = f"{number} {one if number == '1' else many}"
    return said + _per_unit(per)


def _money_prefix(match: re.Match[str]) -> str:
    symbol, whole, decimals, magnitude, per = match.groups()
    return _say_money(symbol, whole, decimals, magnitude, per)


def _money_suffix(match: re.Match[str]) -> str:
    whole, decimals, magnitude, symbol, per = match.groups()
    return _say_money(symbol, whole, decimals, magnitude, per)


def _temperature(match: re.Match[str]) -> str:
    number, scale, celsius, fahrenheit = match.groups()
    degrees = "degree" if number == "1" else "degrees"
    if celsius or (scale and scale in "Cc"):
        return f"{number} {degrees} Celsius"
    if fahrenheit or scale:
        return f"{number} {degrees} Fahrenheit"
    return f"{number} {degrees}"


def _unit(match: re.Match[str]) -> str:
    number, unit = match.groups()
    return f"{number} {_unit_name(unit, number)}"


def say_english(text: str) -> str:
    """Numbers, units, times, money and abbreviations, for English."""
    if "," in text:
        text = _THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), text)
    text = _MONEY_PREFIX_RE.sub(_money_prefix, text)
    text = _MONEY_SUFFIX_RE.sub(_money_suffix, text)
    if ":" in text:
        text = _TIME_RANGE_RE.sub(" to ", text)
    text = _TIME_12_RE.sub(_time_12, text)
    if ":" in text:
        text = _TIME_24_RE.sub(_time_24, text)
    text = _RANGE_RE.sub(r"\1 to \2", text)
    if "°" in text or "℃" in text or "℉" in text:
        text = _MINUS_RE.sub("minus ", text)
        text = _TEMPERATURE_RE.sub(_temperature, text)
    if "%" in text:
        text = _PERCENT_RE.sub(r"\1 percent", text)
    text = _UNIT_RE.sub(_unit, text)
    for pattern, replacement in _ENGLISH_WORDS:
        text = pattern.sub(replacement, text)
    return text
