"""The media repository (docs/media.md).

- ``service``: uploads, downloads, thumbnails, previews, quotas, retention, admin.
- ``storage``: where the bytes live (local files or S3) behind one interface.
- ``uploads``: request bodies spooled to disk and hashed as they arrive.
- ``thumbnails``: Pillow work (on worker threads) and choosing sizes.
- ``previews``: URL previews with address checks and size/time limits.
- ``responses``: safety headers and back-pressured streaming of stored bytes.
"""

from homeserver.services.media.service import MediaService

__all__ = ["MediaService"]
