"""Install snippets pointing each SDK at this server."""

from __future__ import annotations

from urllib.parse import urlsplit


def for_source(write_key: str, public_url: str) -> dict[str, str]:
    url = urlsplit(public_url)
    host = url.netloc
    scheme = url.scheme or "http"
    return {
        "analytics-next (npm)": (
            'import { AnalyticsBrowser } from "@segment/analytics-next";\n'
            "export const analytics = AnalyticsBrowser.load(\n"
            f'  {{ writeKey: "{write_key}", cdnURL: "{public_url}" }},\n'
            f'  {{ integrations: {{ "Segment.io": {{ apiHost: "{host}/v1",'
            f' protocol: "{scheme}" }} }} }},\n'
            ");\n"
        ),
        "@segment/analytics-node": (
            'import { Analytics } from "@segment/analytics-node";\n'
            "const analytics = new Analytics(\n"
            f'  {{ writeKey: "{write_key}", host: "{public_url}" }},\n'
            ");\n"
        ),
        "segment-analytics-python": (
            "from segment import analytics\n"
            f'analytics.write_key = "{write_key}"\n'
            f'analytics.host = "{public_url}"\n'
        ),
        "rudder-sdk-python": (
            "import rudderstack.analytics as rudder_analytics\n"
            f'rudder_analytics.write_key = "{write_key}"\n'
            f'rudder_analytics.dataPlaneUrl = "{public_url}"\n'
        ),
        "@rudderstack/analytics-js": (
            "// The bundled build carries its plugins: nothing is fetched from a CDN.\n"
            'import { RudderAnalytics } from "@rudderstack/analytics-js/bundled";\n'
            "const analytics = new RudderAnalytics();\n"
            f'analytics.load("{write_key}", "{public_url}", {{\n'
            f'  configUrl: "{public_url}",\n'
            '  plugins: ["XhrQueue", "StorageEncryption", "StorageMigrator"],\n'
            "});\n"
        ),
        "curl": (
            f"curl -u '{write_key}:' -H 'Content-Type: application/json' \\\n"
            f'  -d \'{{"userId": "u-1", "event": "Signed Up"}}\' {public_url}/v1/track\n'
        ),
    }
