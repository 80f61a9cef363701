#!/usr/bin/env python3
"""Generate conf/prices/prices.json from LiteLLM's price table.

Usage:
    python3 conf/prices/generate.py litellm-X.Y.Z-*.whl [--out PATH]
    python3 conf/prices/generate.py model_prices_and_context_window_backup.json --version X.Y.Z [--out PATH]

Given a wheel, the JSON (litellm/model_prices_and_context_window_backup.json), the
version (from the wheel's dist-info METADATA) and the licence text (dist-info LICENSE,
written to LICENSE-litellm.txt next to the output; the script stops if it is not MIT)
are read straight from the archive. Given
the JSON itself, --version is required. The sha256 written to "source" is that of the
JSON file's bytes.

Python 3.11 standard library only. The output is deterministic: the same input gives
byte-identical output, one model per line, keys sorted.

What is kept (see SELECT below): chat and embedding models of the providers the gateway
talks to, with non-zero prices. Model keys lose LiteLLM's routing prefix (`gemini/`,
`mistral/`, `xai/`, ...), except Bedrock ids, which stay as Bedrock names them; Bedrock
cross-region inference profiles (`us.`, `eu.`, ...) are kept only where LiteLLM prices
them differently from the base id (the gateway's lookup falls back from `us.X` to `X`).

Every kept model must match one of TIER_RULES (ordered regexes, first match wins);
otherwise the script fails, so a new family never gets a tier silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

LITELLM_JSON = "litellm/model_prices_and_context_window_backup.json"
SOURCE_NAME = "LiteLLM model_prices_and_context_window_backup.json"
SOURCE_URL = "https://github.com/BerriAI/litellm"
SOURCE_LICENSE = "MIT"
DEFAULT_OUT = Path(__file__).resolve().parent / "prices.json"
# The wheel's licence text, written next to the output when reading a wheel.
LICENSE_FILE = "LICENSE-litellm.txt"

KEEP_MODES = ("chat", "embedding")

# ---------------------------------------------------------------------------
# Selection.
#
# Each entry: (our provider name, LiteLLM `litellm_provider` values, key prefix to strip,
# regex the stripped key must fully match). Order is priority: when two LiteLLM entries
# end up with the same key, the one from the earlier SELECT entry wins, so first-party
# providers come first and resellers/hosts last. Provider names follow the gateway's
# provider kinds where one exists (`google` for the Gemini API, `bedrock`, `cohere`).
# ---------------------------------------------------------------------------
DATE = r"(-\d{4}-\d{2}-\d{2})?"
SELECT: list[tuple[str, tuple[str, ...], str, str]] = [
    (
        "openai",
        ("openai",),
        "",
        r"gpt-4o(-mini)?" + DATE
        + r"|gpt-4\.1(-mini|-nano)?" + DATE
        + r"|gpt-[56](\.\d+)?(-(mini|nano|chat|chat-latest|astra|sol|terra|luna))?" + DATE
        + r"|o[134](-mini)?" + DATE
        + r"|text-embedding-3-(small|large)|text-embedding-ada-002",
    ),
    ("anthropic", ("anthropic",), "", r"claude-[a-z0-9-]+"),
    (
        "google",
        ("gemini",),
        "gemini/",
        r"gemini-\d+(\.\d+)?-(pro|flash|flash-lite)(-preview)?"
        + r"|gemini-(pro|flash|flash-lite)-latest"
        + r"|gemini-embedding-[0-9a-z-]+",
    ),
    ("cohere", ("cohere_chat", "cohere"), "cohere/", r"command-[a-z0-9-]+|c4ai-aya-[a-z0-9-]+|embed-[a-z0-9.-]+"),
    (
        "mistral",
        ("mistral",),
        "mistral/",
        r"mistral-(large|medium|small|tiny)(-[0-9a-z.-]+)?"
        + r"|ministral-[0-9a-z-]+|magistral-(small|medium)-latest|codestral-(latest|\d{4})"
        + r"|devstral-[a-z-]+|open-mistral-nemo|pixtral-large-latest|voxtral-small-[0-9a-z]+"
        + r"|(mistral|codestral)-embed(-\d+)?",
    ),
    (
        "deepseek",
        ("deepseek",),
        "deepseek/",
        r"deepseek-(chat|reasoner|flash|v3\.2|v4-flash|v4-pro)",
    ),
    (
        "xai",
        ("xai",),
        "xai/",
        r"grok-\d+(\.\d+)?(-\d{4})?(-(reasoning|non-reasoning))?(-latest)?|grok-code-fast(-1)?(-\d{4})?",
    ),
    ("groq", ("groq",), "groq/", r"openai/gpt-oss-(20|120)b"),
    (
        "bedrock",
        ("bedrock", "bedrock_converse"),
        "",
        r"((us|eu|apac|au|jp|ca|global|us-gov)\.)?"
        + r"(anthropic\.claude-(3|haiku|sonnet|opus|mythos|fable)[0-9a-z.:-]*"
        + r"|amazon\.nova-[0-9a-z.:-]+|meta\.llama[34][0-9a-z.:-]*|mistral\.[0-9a-z.:-]+)",
    ),
    (
        "together_ai",
        ("together_ai",),
        "together_ai/",
        r"meta-llama/(Meta-)?Llama-(3\.[13]-(8B|70B|405B)|3-(8B|70B)|4-[A-Za-z]+-17B-\d+E)-Instruct(-Turbo)?",
    ),
    (
        "fireworks_ai",
        ("fireworks_ai",),
        "fireworks_ai/",
        r"accounts/fireworks/models/(llama-v3p[13]-(8b|70b|405b)-instruct|llama4-(scout|maverick)-instruct-basic)",
    ),
]

# Entries that match SELECT but are left out on purpose: (LiteLLM key, reason).
EXCLUDE: dict[str, str] = {
    # LiteLLM lists 1e-4/token (1000x its siblings, e.g. embed-english-light-v3.0 at 1e-7):
    # a data error upstream; shipping it would make routing and cost reports wrong.
    "embed-multilingual-light-v3.0": "price 1000x its siblings in LiteLLM (upstream data error)",
    # Vertex-style `@date` spelling under the Bedrock provider: not a Bedrock model id.
    "anthropic.claude-haiku-4-5@20251001": "not a Bedrock model id",
}

BEDROCK_REGION = re.compile(r"^(us|eu|apac|au|jp|ca|global|us-gov)\.(.+)$")

# ---------------------------------------------------------------------------
# Quality tiers (ours, not LiteLLM's): economy < standard < premium.
#
# Ordered rules, first match wins, matched with re.search against the final model key
# (so Bedrock ids like `anthropic.claude-opus-4-7` and hosted ids like
# `meta-llama/Llama-3.3-70B-Instruct-Turbo` match the same family rules). The tier says
# how capable a model is, not how much it costs: routing uses the prices for cost.
#   premium  = flagship and reasoning models
#   standard = strong mid-size models
#   economy  = small/cheap models and all embedding models
# ---------------------------------------------------------------------------
TIER_RULES: list[tuple[str, str]] = [
    # Embeddings (all providers).
    (r"embed", "economy"),
    # OpenAI. GPT-5.x/6.x size codenames as LiteLLM lists them: astra > sol > terra > luna.
    (r"^gpt-4o-mini", "economy"),
    (r"^gpt-4\.1-nano", "economy"),
    (r"^gpt-4\.1-mini", "standard"),
    (r"^gpt-[56](\.\d+)?-(nano|luna)", "economy"),
    (r"^gpt-[56](\.\d+)?-(mini|terra)", "standard"),
    (r"^gpt-(4o|4\.1|5|6)", "premium"),
    (r"^o\d-mini", "standard"),
    (r"^o\d", "premium"),
    (r"(^|/)gpt-oss-120b", "standard"),
    (r"(^|/)gpt-oss-20b", "economy"),
    # Anthropic (first-party and Bedrock ids).
    (r"claude-3-haiku|claude-instant", "economy"),
    (r"claude-3-5-haiku|claude-haiku-", "standard"),
    (r"claude-", "premium"),  # opus, sonnet, mythos, fable
    # Google Gemini.
    (r"gemini-.*flash-lite|gemini-1\.5-flash-8b", "economy"),
    (r"gemini-.*flash", "standard"),
    (r"gemini-.*pro", "premium"),
    # Cohere.
    (r"command-r-plus", "standard"),
    (r"command-r|c4ai-aya", "economy"),  # command-r, command-r7b, aya-expanse-32b
    (r"command-a", "premium"),
    # Mistral (first-party and Bedrock `mistral.` ids).
    (r"mistral-large|pixtral-large|magistral-medium", "premium"),
    (r"mistral-medium|devstral-(medium|latest|2-123b)|codestral", "standard"),
    (r"mistral-small|mistral-tiny|ministral|magistral-small|devstral-small|open-mistral-nemo", "economy"),
    (r"mistral-7b|mixtral-8x7b|voxtral", "economy"),
    # DeepSeek.
    (r"deepseek-(reasoner|r1)|deepseek-v4-pro", "premium"),
    (r"deepseek-", "standard"),  # deepseek-chat, v3.2, v4-flash, flash
    # xAI.
    (r"grok-code", "standard"),
    (r"grok-\d+(\.\d+)?-(mini|fast)", "economy"),
    (r"grok-\d", "premium"),
    # Amazon Nova.
    (r"nova-premier|nova-2-pro", "premium"),
    (r"nova-pro|nova-2-lite", "standard"),
    (r"nova-lite|nova-micro", "economy"),
    # Llama (Bedrock meta., Together, Fireworks): 70B and up (and Llama 4 Maverick) are standard.
    (r"(?i)llama.*(70b|90b|405b|maverick)", "standard"),
    (r"(?i)llama", "economy"),  # 1B-11B, Llama 4 Scout
]


def tier_for(key: str) -> str:
    for pattern, tier in TIER_RULES:
        if re.search(pattern, key):
            return tier
    raise SystemExit(f"error: no tier rule matches {key!r}: add one to TIER_RULES")


# ---------------------------------------------------------------------------
# Reading the source.
# ---------------------------------------------------------------------------
def read_source(path: Path, version: str | None) -> tuple[bytes, str, str | None]:
    """Returns (JSON bytes, litellm version, licence text if read from a wheel)."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            data = whl.read(LITELLM_JSON)
            metas = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
            if len(metas) != 1:
                raise SystemExit(f"error: expected one dist-info/METADATA in {path}")
            meta = whl.read(metas[0]).decode("utf-8")
            licenses = [n for n in whl.namelist() if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
            license_text = whl.read(licenses[0]).decode("utf-8") if len(licenses) == 1 else None
        m = re.search(r"^Name: (.+)$", meta, re.M)
        if not m or m.group(1).strip().lower() != "litellm":
            raise SystemExit(f"error: {path} is not a litellm wheel")
        m = re.search(r"^Version: (.+)$", meta, re.M)
        if not m:
            raise SystemExit(f"error: no Version in {metas[0]}")
        wheel_version = m.group(1).strip()
        if version and version != wheel_version:
            raise SystemExit(f"error: --version {version} but the wheel is {wheel_version}")
        if license_text is None or "MIT License" not in license_text:
            raise SystemExit(f"error: no MIT LICENSE in {path}'s dist-info: review the licence by hand")
        return data, wheel_version, license_text
    if not version:
        raise SystemExit("error: --version is required when reading the JSON directly")
    return path.read_bytes(), version, None


def as_price(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def as_count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    return None  # LiteLLM has a few placeholder strings here


def as_rate(value: object) -> float | None:
    """An optional rate (cache read/write, reasoning). LiteLLM writes 0 for some of these
    where the provider has no separate rate (e.g. DeepSeek's cache_creation_input_token_cost),
    and no provider bills them at zero, so 0 reads as null: billed at the base price."""
    price = as_price(value)
    return None if price == 0.0 else price


def convert(key: str, provider: str, entry: dict) -> dict | None:
    mode = entry.get("mode")
    inp = as_price(entry.get("input_cost_per_token"))
    out = as_price(entry.get("output_cost_per_token"))
    if inp is None:
        return None
    if out is None:
        if mode != "embedding":
            return None
        out = 0.0
    if inp == 0.0 and out == 0.0:
        return None  # free previews / unpriced placeholders: no basis for cost or routing
    return {
        "provider": provider,
        "mode": mode,
        "input": inp,
        "output": out,
        "cache_read": as_rate(entry.get("cache_read_input_token_cost")),
        "cache_write": as_rate(entry.get("cache_creation_input_token_cost")),
        "reasoning": as_rate(entry.get("output_cost_per_reasoning_token")),
        "context_window": as_count(entry.get("max_input_tokens")),
        "max_output_tokens": as_count(entry.get("max_output_tokens")),
        "tier": tier_for(key),
    }


def price_key(m: dict) -> tuple:
    return (m["input"], m["output"], m["cache_read"], m["cache_write"], m["reasoning"])


def select(raw: dict) -> tuple[dict[str, dict], list[str]]:
    notes: list[str] = []
    chosen: dict[str, tuple[int, bool, str, dict]] = {}  # key -> (rank, exact, litellm key, model)
    for rank, (provider, litellm_providers, prefix, pattern) in enumerate(SELECT):
        rx = re.compile(pattern)
        for lkey in sorted(raw):
            entry = raw[lkey]
            if not isinstance(entry, dict) or entry.get("litellm_provider") not in litellm_providers:
                continue
            if entry.get("mode") not in KEEP_MODES:
                continue
            key = lkey[len(prefix):] if prefix and lkey.startswith(prefix) else lkey
            if not rx.fullmatch(key):
                continue
            if lkey in EXCLUDE:
                notes.append(f"excluded {lkey}: {EXCLUDE[lkey]}")
                continue
            model = convert(key, provider, entry)
            if model is None:
                notes.append(f"skipped {lkey}: no usable price")
                continue
            # Same provider, same stripped key (e.g. `deepseek-chat` and `deepseek/deepseek-chat`):
            # prefer the entry spelled exactly as the key, then the first in sorted order.
            exact = lkey == key
            prev = chosen.get(key)
            if prev is not None:
                if prev[0] < rank or (prev[0] == rank and (prev[1] or not exact)):
                    if price_key(prev[3]) != price_key(model):
                        notes.append(f"collision {key}: kept {prev[2]}, dropped {lkey} (prices differ)")
                    continue
                if price_key(prev[3]) != price_key(model):
                    notes.append(f"collision {key}: kept {lkey}, dropped {prev[2]} (prices differ)")
            chosen[key] = (rank, exact, lkey, model)

    models = {k: v[3] for k, v in chosen.items()}
    # Bedrock cross-region inference profiles: keep only where priced unlike the base id.
    for key in list(models):
        m = BEDROCK_REGION.match(key)
        if not m or models[key]["provider"] != "bedrock":
            continue
        base = models.get(m.group(2))
        if base is not None and price_key(base) == price_key(models[key]):
            del models[key]
    return dict(sorted(models.items())), notes


# ---------------------------------------------------------------------------
# Output: compact JSON, one model per line.
# ---------------------------------------------------------------------------
def fmt_value(v: object) -> str:
    if isinstance(v, float):
        text = repr(v)  # shortest round-trip form
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)
    return json.dumps(v)


def dump(source: dict, models: dict[str, dict]) -> str:
    lines = ["{", '"source": ' + json.dumps(source, ensure_ascii=False) + ",", '"models": {']
    items = list(models.items())
    for i, (key, m) in enumerate(items):
        body = ",".join(f"{json.dumps(k)}:{fmt_value(v)}" for k, v in m.items())
        lines.append(f"{json.dumps(key)}:{{{body}}}" + ("," if i + 1 < len(items) else ""))
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="litellm wheel (.whl) or the price JSON itself")
    ap.add_argument("--version", help="litellm version (required when SOURCE is the JSON)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    ap.add_argument("--verbose", action="store_true", help="print every exclusion and collision")
    args = ap.parse_args(argv)

    data, version, license_text = read_source(args.source, args.version)
    raw = json.loads(data)
    models, notes = select(raw)

    source = {
        "name": SOURCE_NAME,
        "package": "litellm",
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "license": SOURCE_LICENSE,
        "url": SOURCE_URL,
    }
    text = dump(source, models)
    json.loads(text)  # sanity: what we wrote parses
    args.out.write_text(text, encoding="utf-8")
    if license_text is not None:
        (args.out.parent / LICENSE_FILE).write_text(license_text, encoding="utf-8")

    tiers: dict[str, int] = {}
    providers: dict[str, int] = {}
    for m in models.values():
        tiers[m["tier"]] = tiers.get(m["tier"], 0) + 1
        providers[m["provider"]] = providers.get(m["provider"], 0) + 1
    print(f"litellm {version} sha256 {source['sha256']}", file=sys.stderr)
    print(f"wrote {len(models)} models to {args.out}", file=sys.stderr)
    print("tiers: " + ", ".join(f"{t}={tiers.get(t, 0)}" for t in ("economy", "standard", "premium")), file=sys.stderr)
    print("providers: " + ", ".join(f"{p}={n}" for p, n in sorted(providers.items())), file=sys.stderr)
    for note in notes if args.verbose else [n for n in notes if not n.startswith("skipped")]:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
