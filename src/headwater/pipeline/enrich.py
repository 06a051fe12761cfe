"""Enrichment off the hot path: user agent, campaign and bot flag."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from ua_parser import parse as parse_user_agent

_BOT = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|lighthouse|headlesschrome|phantomjs|facebookexternalhit"
    r"|bingpreview|pingdom|uptimerobot|siteaudit|python-requests|curl/|wget/|scrapy",
    re.IGNORECASE,
)
_UTM = {
    "utm_campaign": "name",
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_term": "term",
    "utm_content": "content",
}


class Agent(NamedTuple):
    browser: str | None
    os: str | None
    device: str | None
    is_bot: bool


@lru_cache(maxsize=8192)
def agent(user_agent: str) -> Agent:
    """Browser, OS and device families of a user agent, and whether it is a bot."""
    if not user_agent:
        return Agent(None, None, None, False)
    result = parse_user_agent(user_agent)
    browser = result.user_agent.family if result.user_agent else None
    os_name = result.os.family if result.os else None
    device = result.device.family if result.device else None
    is_bot = device == "Spider" or bool(_BOT.search(user_agent))
    return Agent(browser, os_name, device, is_bot)


def campaign_from_url(url: Any) -> dict[str, str] | None:
    """UTM parameters of a page URL as a Segment ``context.campaign`` object."""
    if not isinstance(url, str) or "utm_" not in url:
        return None
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    found = {_UTM[k]: v for k, v in parse_qsl(query) if k in _UTM and v}
    return found or None


def campaign(context: dict[str, Any] | None) -> dict[str, Any] | None:
    """The event's campaign: as sent, else derived from ``context.page.url``."""
    if not context:
        return None
    sent = context.get("campaign")
    if isinstance(sent, dict) and sent:
        return sent
    page = context.get("page")
    return campaign_from_url(page.get("url")) if isinstance(page, dict) else None
