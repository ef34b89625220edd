"""Which rooms a user is joined to, local or not."""

from typing import Any


async def joined_rooms(hs: Any, user_id: str, remote: bool) -> list[str]:
    """The rooms ``user_id`` (a user of another server if ``remote``) is joined to.

    Our users' come from memory (``hs.user_rooms``). Other servers' users'
    come from the database: the in-memory map follows each persisted event's
    own membership only, while a user of another server becomes a member in
    ways it does not see (the state received when one of our users joins
    their room, say), so a map loaded for them once would go stale.
    """
    if remote:
        memberships = await hs.events_store.get_user_memberships(user_id)
    else:
        memberships = await hs.user_rooms.get(user_id)
    return [room_id for room_id, (membership, _, _) in memberships.items() if membership == "join"]
