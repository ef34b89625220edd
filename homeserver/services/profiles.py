"""User profiles: display names and avatars of local users."""

from typing import Any


class ProfileService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    async def get_local_profile(self, user_id: str) -> dict[str, str]:
        """displayname / avatar_url of a local user, only the keys that are set.

        This is what goes into the user's m.room.member events.
        """
        rows = await self.hs.database.select(
            "get_profile", "SELECT displayname, avatar_url FROM users WHERE user_id = ?", (user_id,)
        )
        if not rows:
            return {}
        displayname, avatar_url = rows[0]
        profile = {}
        if displayname is not None:
            profile["displayname"] = displayname
        if avatar_url is not None:
            profile["avatar_url"] = avatar_url
        return profile
