"""The HomeServer: one object holding the configuration, clock, database and services.

Transports receive it and call its services; nothing below the services
layer sees it.
"""

from typing import Any
from urllib.parse import urlsplit

import homeserver
from crypto.keys import ServerSigningKey
from homeserver.config import HomeserverConfig
from homeserver.config.loader import parse_duration_ms
from homeserver.services.account_data import AccountDataService
from homeserver.services.accounts import AccountService
from homeserver.services.auth import Auth
from homeserver.services.backfill import BackfillService
from homeserver.services.client_events import ClientEventSerializer
from homeserver.services.clock import Clock
from homeserver.services.device_lists import DeviceListsService
from homeserver.services.directory import DirectoryService
from homeserver.services.e2e_keys import E2eKeysService
from homeserver.services.events import EventCache, EventsService
from homeserver.services.federation_client import FederationClient
from homeserver.services.federation_edus import FederationEduHandler
from homeserver.services.federation_events import FederationEventHandler
from homeserver.services.federation_inbound import FederationInbound
from homeserver.services.federation_membership import FederationMembership
from homeserver.services.federation_reads import FederationReads
from homeserver.services.federation_sender import FederationSender
from homeserver.services.filters import FilterService
from homeserver.services.keyring import Keyring
from homeserver.services.media import MediaService
from homeserver.services.notifier import Notifier
from homeserver.services.pagination import PaginationService
from homeserver.services.presence import PresenceService
from homeserver.services.profiles import ProfileService
from homeserver.services.push import PushService
from homeserver.services.receipts import ReceiptsService
from homeserver.services.relations import RelationsService
from homeserver.services.rooms.creation import RoomCreator
from homeserver.services.rooms.dag import RoomDags
from homeserver.services.rooms.membership import MembershipService
from homeserver.services.rooms.persister import EventPersister
from homeserver.services.rooms.sender import RoomEventSender
from homeserver.services.rooms.state import RoomStates
from homeserver.services.server_keys import ServerKeys
from homeserver.services.stream_ids import StreamIdAllocator
from homeserver.services.sync import SyncService
from homeserver.services.to_device import ToDeviceService
from homeserver.services.typing import TypingService
from homeserver.services.uia import UserInteractiveAuth
from homeserver.services.user_rooms import StateGroupCache, UserRooms
from homeserver.services.voip import VoipService
from storage import Database
from storage.events import EventsStore
from storage.server_keys import ServerKeyStore


class HomeServer:
    version = homeserver.__version__

    def __init__(
        self,
        config: HomeserverConfig,
        reactor: Any,
        database: Database,
        signing_keys: list[ServerSigningKey],
        max_stream_ordering: int = 0,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = Clock(reactor)
        self.database = database
        self.server_name = config.server_name
        self.server_keys = ServerKeys(
            config.server_name,
            signing_keys,
            config.get("old_signing_keys") or {},
            parse_duration_ms(config["key_refresh_interval"]),
            self.clock,
        )
        # Federation transport: signed outbound requests, other servers' keys
        self.federation_client = FederationClient.from_config(
            config, reactor, config.server_name, self.server_keys.signing_key,
            now_ms=self.clock.time_msec,
        )
        self.keyring = Keyring(
            config.server_name, self.clock.time_msec, self.server_keys, self.federation_client,
            ServerKeyStore(database), config["trusted_key_servers"],
        )
        # Events and rooms
        self.events_store = EventsStore(database)
        self.event_cache = EventCache()
        self.events = EventsService(self.events_store, self.event_cache)
        self.stream_ids = StreamIdAllocator(max_stream_ordering)
        self.notifier = Notifier(self.clock, max_stream_ordering)
        self.room_states = RoomStates(self.events_store)
        self.user_rooms = UserRooms(self.events_store)
        self.state_groups = StateGroupCache(self.events_store)
        self.room_dags = RoomDags(self.events_store)
        self.persister = EventPersister(
            self.events_store, lambda f: reactor.callLater(0, f)
        )
        self.persister.on_stored.append(self._on_stored)
        self.persister.on_announced.append(self._announce)
        self.persister.on_failed.append(self._on_persist_failed)
        # Federation sender: our events and EDUs to other servers, in transactions. It
        # catches destinations up (from their durable positions) once the reactor runs.
        self.federation_sender = FederationSender(self)
        reactor.callWhenRunning(lambda: reactor.callLater(0, self.federation_sender.start))
        self.room_sender = RoomEventSender(self)
        self.room_creator = RoomCreator(self)
        self.membership = MembershipService(self)
        self.profiles = ProfileService(self)
        self.directory = DirectoryService(self)
        self.client_events = ClientEventSerializer(self)
        self.filters = FilterService(self)
        self.sync = SyncService(self)
        self.pagination = PaginationService(self)
        self.backfill = BackfillService(self)
        self.voip = VoipService(self)
        self.relations = RelationsService(self)
        self.persister.on_persisted.append(self.relations.on_persisted)
        # What other servers may read of our rooms (federation /event, /state, /backfill...)
        self.federation_reads = FederationReads(self)
        # Events other servers send us, and joins, leaves, invites, knocks across servers
        self.federation_events = FederationEventHandler(self)
        self.federation_inbound = FederationInbound(self)
        self.federation_membership = FederationMembership(self)
        # Accounts: access tokens, registration, login, devices, UIA
        self.auth = Auth(self)
        self.accounts = AccountService(self)
        self.uia = UserInteractiveAuth(self)
        # A deactivated user leaves their rooms, then the user directory.
        self.accounts.deactivation_hooks.append(self.membership.on_user_deactivated)
        self.accounts.deactivation_hooks.append(self.profiles.on_user_deactivated)
        # Typing, presence, account data, to-device (to_device hooks device deletion)
        self.typing = TypingService(self)
        self.presence = PresenceService(self)
        self.account_data = AccountDataService(self)
        self.to_device = ToDeviceService(self)
        # Receipts, push rules and unread counts (push evaluates each committed batch)
        self.receipts = ReceiptsService(self)
        self.push = PushService(self)
        # End-to-end encryption keys and the device-list stream /sync follows (device
        # lists record joins and leaves from each committed batch; keys hook device deletion)
        self.device_lists = DeviceListsService(self)
        self.e2e_keys = E2eKeysService(self)
        self.federation_edus = FederationEduHandler(self)
        # The media repository (uploads, downloads, thumbnails, previews)
        self.media = MediaService(self)

    def _on_stored(self, all_items: list[Any]) -> None:
        """After a batch commits, before its senders hear: the caches.

        Outliers and rejected events (from other servers) are not part of any
        room's timeline: only invites and the like in rooms we are not in
        reach the invitee's room list.
        """
        self.stream_ids.mark_persisted(all_items[-1].stream_ordering)
        self.room_dags.on_persisted(all_items)
        items = [i for i in all_items if i.in_timeline]
        memberships = [i for i in all_items if i.in_timeline or i.out_of_room_membership]
        for item in items:
            room = self.room_states.get_cached(item.pdu.room_id)
            if room is not None:
                room.add_persisted(item.stream_ordering, item.pdu.event_id, item.state_group)
            target = item.redacted_target
            if target is not None:
                self.event_cache.put(target.with_redacted_because(item.pdu.event_id))
        self.user_rooms.on_persisted(memberships)
        self.notifier.position = max(self.notifier.position, all_items[-1].stream_ordering)

    def _announce(self, all_items: list[Any]) -> None:
        """After the senders' responses: unread counts, then wake whoever waits
        (a count MUST come with its event)."""
        items = [i for i in all_items if i.in_timeline]
        if items:
            self.push.on_persisted(items)
        self.notifier.on_persisted(
            [i for i in all_items if i.in_timeline or i.out_of_room_membership]
        )

    def _on_persist_failed(self, room_ids: set[str]) -> None:
        for room_id in room_ids:
            self.room_states.invalidate(room_id)

    @property
    def federation_server_address(self) -> str:
        """host:port other servers should reach us at, for /.well-known/matrix/server."""
        url = urlsplit(self.config.public_baseurl)
        return f"{url.hostname}:{url.port or 443}"
