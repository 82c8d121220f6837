"""The image's HEALTHCHECK: exit 0 when /healthz answers 200 on this container's port.

Standard library only, and no curl in the image: one less binary to patch.
"""

import os
import sys
import urllib.request

port = os.environ.get("CLIP_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:  # URLError and HTTPError are OSErrors
    print(f"healthcheck: {e}", file=sys.stderr)
    sys.exit(1)
