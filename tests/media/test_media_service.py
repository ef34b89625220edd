"""The media service in process, on SQLite and PostgreSQL: content shared by hash and
released with its last media id, the retention job driven by a fake clock, and the S3
back-end's interface against moto's S3 server on 127.0.0.1."""

import hashlib
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from homeserver.errors import MatrixError
from homeserver.services.clock import Clock
from homeserver.services.media.storage import MediaNotStored, S3MediaStorage, content_key
from tests.support.homeserver import add_user, make_homeserver

DAY_MS = 86_400_000


class MediaServiceTestsMixin:
    engine = "sqlite3"

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(
            self.stack,
            directory,
            self.engine,
            media_retention={"local_media_lifetime": "30d"},
            media_upload_limits=[{"time_period": "1d", "max_size": "1K"}],
        )
        self.media = self.hs.media

    def tearDown(self):
        self.media.stop()
        d = defer.ensureDeferred(self.hs.database.close())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    async def _upload(self, user_id: str, data: bytes, content_type: str = "text/plain") -> str:
        sink = self.media.new_upload_sink()
        sink.write(data)
        mxc = await self.media.upload(user_id, sink, content_type, "f.txt")
        return mxc.rsplit("/", 1)[1]

    def _stored(self, data: bytes) -> bool:
        return self.media.storage._exists(content_key(hashlib.sha256(data).hexdigest()))

    def test_identical_uploads_share_content_until_the_last_goes(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            first = await self._upload(alice, b"same bytes")
            second = await self._upload(alice, b"same bytes")
            other = await self._upload(alice, b"other bytes")
            self.assertNotEqual(first, second)
            self.assertTrue(self._stored(b"same bytes"))
            files = [f for _, _, fs in os.walk(Path(self.media.store_path) / "content") for f in fs]
            self.assertEqual(len(files), 2)

            self.assertTrue(await self.media.delete(self.hs.server_name, first))
            self.assertTrue(self._stored(b"same bytes"))
            record = await self.media.get_media(self.hs.server_name, second)
            reader = await self.media.open_content(record)
            self.assertEqual(reader.read(100), b"same bytes")
            reader.close()
            self.assertTrue(await self.media.delete(self.hs.server_name, second))
            self.assertFalse(self._stored(b"same bytes"))
            self.assertTrue(self._stored(b"other bytes"))
            self.assertFalse(await self.media.delete(self.hs.server_name, second))
            with self.assertRaises(MatrixError) as e:
                await self.media.get_media(self.hs.server_name, second)
            self.assertEqual(e.exception.errcode, "M_NOT_FOUND")
            self.assertIsNotNone(await self.media.get_media(self.hs.server_name, other))

        return defer.ensureDeferred(go())

    def test_quota_counts_the_period(self):
        async def go():
            bob = await add_user(self.hs, "bob")
            await self._upload(bob, b"x" * 600)
            with self.assertRaises(MatrixError) as e:
                await self._upload(bob, b"y" * 600)
            self.assertEqual((e.exception.errcode, e.exception.status), ("M_FORBIDDEN", 403))
            # Nothing of the refused upload is left behind.
            self.assertFalse(self._stored(b"y" * 600))
            self.assertEqual(os.listdir(self.media.tmp_dir), [])

        return defer.ensureDeferred(go())

    def test_retention_and_expiry_run_on_the_clock(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            old = await self._upload(alice, b"never downloaded")
            used = await self._upload(alice, b"downloaded lately")
            created = await self.media.create(alice)
            pending = created["content_uri"].rsplit("/", 1)[1]

            fake = task.Clock()
            fake.advance(time.time() + 40 * DAY_MS / 1000)  # 40 days from now
            now_ms = int(fake.seconds() * 1000)
            await self.media.store.update_last_access(
                [(self.hs.server_name, used, now_ms - 2 * DAY_MS)]
            )
            self.media.start(clock=Clock(fake))
            job = self.media.maintenance
            self.assertIsNone(job.last_run)
            fake.advance(3599)
            self.assertIsNone(job.last_run)  # hourly
            fake.advance(1)
            await job.last_run
            self.assertEqual(job.runs, 1)

            store = self.media.store
            name = self.hs.server_name
            self.assertIsNone(await store.get_media(name, old))
            self.assertIsNone(await store.get_media(name, pending))
            self.assertIsNotNone(await store.get_media(name, used))
            self.assertFalse(self._stored(b"never downloaded"))
            self.assertTrue(self._stored(b"downloaded lately"))

            # Another hour, another run; 29 days later the other one goes too.
            fake.advance(29 * DAY_MS / 1000)
            await job.last_run
            self.assertEqual(job.runs, 2)
            self.assertIsNone(await store.get_media(name, used))

        return defer.ensureDeferred(go())


class SqliteMediaServiceTests(MediaServiceTestsMixin, unittest.TestCase):
    engine = "sqlite3"


class PostgresMediaServiceTests(MediaServiceTestsMixin, unittest.TestCase):
    engine = "psycopg"


class S3StorageTests(unittest.TestCase):
    def setUp(self):
        import boto3
        from moto.server import ThreadedMotoServer
        from twisted.internet import reactor

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        settings = {
            "bucket": "unit-bucket",
            "endpoint_url": f"http://{host}:{port}",
            "region_name": "eu-west-1",
            "access_key_id": "k",
            "secret_access_key": "s",
            "prefix": "p/",
        }
        boto3.client(
            "s3",
            endpoint_url=settings["endpoint_url"],
            region_name="eu-west-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        ).create_bucket(
            Bucket="unit-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        self.tmp = tempfile.mkdtemp()
        self.storage = S3MediaStorage(reactor, settings, self.tmp)

    def tearDown(self):
        self.moto.stop()

    def test_put_get_range_exists_delete(self):
        async def go():
            s = self.storage
            path = os.path.join(self.tmp, "upload")
            Path(path).write_bytes(b"0123456789" * 1000)
            await s.put_file("content/aa/bb/one", path)
            self.assertFalse(os.path.exists(path))  # consumed
            await s.put_bytes("thumbnails/two.png", b"png bytes")
            self.assertTrue(await s.exists("content/aa/bb/one"))
            self.assertFalse(await s.exists("content/aa/bb/none"))

            reader = await s.open("content/aa/bb/one")
            self.assertEqual(reader.read(20000), b"0123456789" * 1000)
            reader.close()
            reader = await s.open("content/aa/bb/one", 5, 7)
            self.assertEqual(reader.read(100), b"5678901")
            reader.close()
            reader = await s.open("content/aa/bb/one", 9995)
            self.assertEqual(reader.read(100), b"56789")
            reader.close()
            local, cleanup = await s.local_copy("thumbnails/two.png")
            self.assertEqual(Path(local).read_bytes(), b"png bytes")
            cleanup()
            self.assertFalse(os.path.exists(local))

            await s.delete("content/aa/bb/one")
            self.assertFalse(await s.exists("content/aa/bb/one"))
            with self.assertRaises(MediaNotStored):
                await s.open("content/aa/bb/one")
            with self.assertRaises(MediaNotStored):
                await s.local_copy("content/aa/bb/one")

        return defer.ensureDeferred(go())
