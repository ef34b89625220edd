"""Writing a new, complete, commented configuration file (and its signing key)."""

import secrets
from pathlib import Path

from crypto.keys import generate_signing_key, write_signing_keys

TEMPLATE = """\
# Homeserver configuration. Key names and shapes follow Synapse's, so the
# common keys of an existing homeserver.yaml work unchanged. Relative paths
# are resolved against the directory of this file. Later --config-path files
# override earlier ones key by key at the top level.

## Server ##

# The public name of this server: the part after the colon in user ids
# (@alice:{server_name}) and room aliases. It cannot be changed later.
server_name: "{server_name}"

# The URL clients use to reach this server. Default: https://<server_name>/
#public_baseurl: https://matrix.example.com/

# Serve /.well-known/matrix/server from this server (to delegate federation
# to the listener port). Default: false
#serve_server_wellknown: false

# Where to listen. Each listener serves some resources: client, federation,
# media, keys, metrics, health. tls: true needs tls_certificate_path and
# tls_private_key_path. x_forwarded: trust X-Forwarded-For from a proxy.
listeners:
  - port: {port}
    bind_addresses: ["{bind_address}"]
    tls: false
    type: http
    x_forwarded: false
    resources:
      - names: [client, federation, media, keys]

# PEM files for listeners with tls: true. Default: none
#tls_certificate_path: /path/to/fullchain.pem
#tls_private_key_path: /path/to/privkey.pem

## Database ##

# sqlite3 (embedded, the default) or psycopg (PostgreSQL; "psycopg2", Synapse's
# name, is accepted too). For PostgreSQL:
#   database:
#     name: psycopg
#     args:
#       dbname: synapse
#       user: synapse
#       password: secret
#       host: 127.0.0.1
#       port: 5432
#       cp_min: 5
#       cp_max: 10
# SQLite's synchronous mode is "normal" by default (an acknowledged write
# survives a crash of the server process); "full" also survives power loss.
database:
  name: sqlite3
  args:
    database: {data_dir}/homeserver.db
    #synchronous: normal

## Keys ##

# This server's ed25519 signing key, in Synapse's format
# ("ed25519 <version> <unpadded base64 seed>"): a Synapse key file works.
signing_key_path: "{signing_key_path}"

# Keys this server used before, as {{"ed25519:<version>": {{key: <base64>, expired_ts: <ms>}}}}.
# Default: {{}}
#old_signing_keys: {{}}

# How long other servers may cache our keys. Default: 1d
#key_refresh_interval: 1d

# Servers trusted to vouch for other servers' keys (notaries).
# Default: [{{server_name: matrix.org}}]
#trusted_key_servers:
#  - server_name: matrix.org

## Federation ##

# Check other servers' TLS certificates. Only turn off for tests. Default: true
#federation_verify_certificates: true

# Address ranges this server never contacts (outbound requests, URL previews).
# Default: the private, loopback, link-local and reserved ranges.
# (ip_range_blacklist is the older spelling and is accepted.)
#ip_range_blocklist: ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", ...]
#ip_range_whitelist: []
# Ranges refused for federation only. Default: ip_range_blocklist
#federation_ip_range_blacklist: []
# Only these servers may federate with us. Default: any server
#federation_domain_whitelist: [example.org]

# Outbound federation requests: timeout, and the back-off for a server that
# does not answer (the wait grows by the multiplier up to the maximum).
#federation:
#  client_timeout: 60s
#  destination_min_retry_interval: 10m
#  destination_retry_multiplier: 2
#  destination_max_retry_interval: 7d

## Rooms ##

# The room version of new rooms. Default: "12"
#default_room_version: "12"

# Who may publish rooms to the public room directory. Default: everyone
#room_list_publication_rules:
#  - action: allow

# Serve our public room list to other servers. Default: false
#allow_public_rooms_over_federation: false
# Serve the public room list to clients without an access token. Default: false
#allow_public_rooms_without_auth: false

## Registration ##

# Anyone may register an account. Default: false
enable_registration: false
# Registration without email or captcha (needed with enable_registration if no
# other check is configured). Default: false
#enable_registration_without_verification: false
# Registration needs a registration token. Default: false
#registration_requires_token: false
# Guests. Default: false
#allow_guest_access: false

# A secret for admin registration (scripts/register_new_matrix_user and
# /_synapse/admin/v1/register). Keep it private.
registration_shared_secret: "{shared_secret}"

## Media ##
# See docs/media.md for the storage back-ends, retention and the admin API.

# Where uploaded content and thumbnails are stored (and where uploads are
# spooled while they arrive, also when media_storage_s3 is set).
media_store_path: {data_dir}/media_store
# Largest upload; bigger ones are refused with 413 M_TOO_LARGE as soon as
# Content-Length (or the bytes received so far) exceed it. Default: 50M
#max_upload_size: 50M
# Images with more pixels than this are never decoded (no thumbnails).
# Default: 32M
#max_image_pixels: 32M
# Thumbnails made when an image is uploaded; requests get the closest one
# at least as large as asked for. Default: the five sizes the spec suggests.
#thumbnail_sizes:
#  - {{width: 32, height: 32, method: crop}}
#  - {{width: 96, height: 96, method: crop}}
#  - {{width: 320, height: 240, method: scale}}
#  - {{width: 640, height: 480, method: scale}}
#  - {{width: 800, height: 600, method: scale}}
# Make (and keep) thumbnails of exactly the size each request asks for
# instead of choosing among thumbnail_sizes. Default: false
#dynamic_thumbnails: false
# Media uploaded while this is true can only be downloaded through the
# authenticated /_matrix/client/v1/media endpoints; media uploaded before
# keeps working on the legacy /_matrix/media ones. Default: true
#enable_authenticated_media: true
# POST /_matrix/media/v1/create: how many created but not yet uploaded media
# ids a user may hold, and how long an unused id lives. Default: 5, 24h
#max_pending_media_uploads: 5
#unused_expiration_time: 24h
# Per-user upload quotas: at most max_size uploaded within each time_period.
# Over it, uploads answer 403 M_FORBIDDEN. Default: no quota
#media_upload_limits:
#  - {{time_period: 1d, max_size: 1G}}
# Delete media not downloaded for this long (local uploads and cached remote
# media separately). Checked hourly. Default: keep forever
#media_retention:
#  local_media_lifetime: 90d
#  remote_media_lifetime: 14d
# Keep content and thumbnails in an S3-compatible bucket instead of on disk.
# Without access_key_id / secret_access_key boto3's usual credential chain is
# used. addressing_style: auto, path (MinIO, most self-hosted stores) or
# virtual. Default: none (local files)
#media_storage_s3:
#  bucket: matrix-media
#  endpoint_url: https://s3.example.com
#  region_name: us-east-1
#  access_key_id: "..."
#  secret_access_key: "..."
#  prefix: "media/"
#  addressing_style: auto
#  verify_tls: true
# Media of other servers is fetched over federation when a user first asks
# for it, then served from media_store_path (max_upload_size applies; it
# is removed after media_retention.remote_media_lifetime). Servers listed
# here are never fetched from and their media, even cached, answers 404.
# Default: []
#prevent_media_downloads_from: [badserver.example]

# URL previews (GET /_matrix/client/v1/media/preview_url). Default: false
#url_preview_enabled: false
# Addresses previews never fetch from; every address a name resolves to is
# checked. Default: ip_range_blocklist (private, loopback, link-local, ...)
#url_preview_ip_range_blacklist: ["127.0.0.0/8", "10.0.0.0/8", ...]
# Exceptions to the list above. Default: []
#url_preview_ip_range_whitelist: []
# URLs never previewed: each entry matches URL parts (scheme, netloc,
# username, password, hostname, port, path, params, query, fragment) with a
# glob, or a regex when it starts with ^. Default: []
#url_preview_url_blacklist:
#  - {{netloc: "*.example.com"}}
#  - {{scheme: http}}
# Largest page or image a preview downloads. Default: 10M
#max_spider_size: 10M

## Application services (bridges) ##

# Registration files of application services. Default: []
#app_service_config_files: []

## VoIP ##

# TURN servers handed to clients by /voip/turnServer, with the coturn shared
# secret ("use-auth-secret") and how long credentials last. Default: none
#turn_uris: ["turn:turn.example.com:3478?transport=udp"]
#turn_shared_secret: "..."
#turn_user_lifetime: 1h
#turn_allow_guests: true

## Presence ##

# Online/offline status. Default: enabled
#presence:
#  enabled: true

## Rate limits ##
# Each is {{per_second, burst_count}}. Defaults are Synapse's.
#rc_message: {{per_second: 0.2, burst_count: 10}}
#rc_registration: {{per_second: 0.17, burst_count: 3}}
#rc_registration_token_validity: {{per_second: 0.1, burst_count: 5}}
#rc_login:
#  address: {{per_second: 0.003, burst_count: 5}}
#  account: {{per_second: 0.003, burst_count: 5}}
#  failed_attempts: {{per_second: 0.17, burst_count: 3}}
#rc_joins:
#  local: {{per_second: 0.1, burst_count: 10}}
#  remote: {{per_second: 0.01, burst_count: 10}}
#rc_joins_per_room: {{per_second: 1, burst_count: 10}}
#rc_invites:
#  per_room: {{per_second: 0.3, burst_count: 10}}
#  per_user: {{per_second: 0.003, burst_count: 5}}
#  per_issuer: {{per_second: 0.5, burst_count: 5}}
#rc_media_create: {{per_second: 10, burst_count: 50}}
#rc_admin_redaction: {{per_second: 1, burst_count: 50}}
#rc_3pid_validation: {{per_second: 0.003, burst_count: 5}}
#rc_presence:
#  per_user: {{per_second: 0.1, burst_count: 1}}
#rc_federation: {{}}

## Operations ##

# A Python logging config (YAML, logging.config.dictConfig format).
# Default: INFO to standard error.
#log_config: log_config.yaml
# Write the process id here while running. Default: none
#pid_file: homeserver.pid
# Serve Prometheus metrics on listeners with the "metrics" resource. Default: false
#enable_metrics: false
"""


def render_config(
    server_name: str,
    signing_key_path: str,
    data_dir: str = "data",
    port: int = 8008,
    bind_address: str = "127.0.0.1",
    shared_secret: str | None = None,
) -> str:
    return TEMPLATE.format(
        server_name=server_name,
        signing_key_path=signing_key_path,
        data_dir=data_dir,
        port=port,
        bind_address=bind_address,
        # hex: never a leading "-", since people type it after -k
        shared_secret=shared_secret or secrets.token_hex(32),
    )


def render_sample_config() -> str:
    """The text of sample_config.yaml (a test keeps the file equal to this)."""
    return render_config(
        "example.com", "data/example.com.signing.key", shared_secret="CHANGE-ME-TO-A-LONG-RANDOM-SECRET"
    )


def generate_config(
    config_path: Path, server_name: str, port: int = 8008, bind_address: str = "127.0.0.1"
) -> None:
    """Write a config, a data directory and a new signing key beside it.

    Refuses (FileExistsError) to overwrite the config or the key.
    """
    config_path = Path(config_path)
    if config_path.exists():
        raise FileExistsError(f"{config_path} already exists; not overwriting it")
    data_dir = config_path.parent / "data"
    key_name = f"{server_name}.signing.key".replace("/", "_")
    key_path = data_dir / key_name
    if key_path.exists():
        raise FileExistsError(f"{key_path} already exists; not overwriting it")
    (data_dir / "media_store").mkdir(parents=True, exist_ok=True)
    write_signing_keys(key_path, [generate_signing_key()])
    text = render_config(server_name, f"data/{key_name}", port=port, bind_address=bind_address)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    with open(config_path, "x") as f:  # "x": never overwrite, even in a race
        f.write(text)
    config_path.chmod(0o600)  # it holds the registration shared secret
