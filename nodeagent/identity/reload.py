"""The issuer Secret's files (trust anchors, issuer certificate and key), watched: a change is
picked up without a restart.

Kubernetes updates a mounted Secret by swapping a symlink, so the three files change at once,
but a reader can still catch one file before the swap and the next after it. A set is taken
only when its key is its certificate's and the issuer chains to one of its trust anchors, every
certificate on the way valid now (a torn read, old ca.crt with a new issuer, fails that check);
anything else is logged once and read again at the next check, and the issuer in use stays.
What is taken is handed to `WorkloadIdentities`, which issues new certificates from it
(established connections keep their TLS sessions; new handshakes use the new material).
"""

import hashlib
import logging
from pathlib import Path

from nodeagent.identity.ca import Authority, issuer_from_pem, read_issuer_files, check_chains_to_anchors
from nodeagent.periodic import Every

log = logging.getLogger("nodeagent.identity")
CHECK_S = 2.0  # how often the files are read (the kubelet brings a Secret's update to the node in up to ~2 minutes: its sync period plus its cache)


class IssuerFiles:
    """`current` is the issuer and anchors of the first read, and the changes are measured from
    that same read: a Secret changed between a load and a later digest would be missed."""

    def __init__(self, directory: Path, now: float):
        """OSError or ValueError if the files cannot be read or do not hold a usable issuer."""
        self.directory = directory
        contents = read_issuer_files(directory)
        self.current: tuple[Authority, bytes] = issuer_from_pem(*contents)
        self._seen = self._digest(contents)
        self._refused: bytes | None = None
        self._poll = Every(CHECK_S, now)

    @staticmethod
    def _digest(contents: tuple[bytes, ...]) -> bytes:
        return hashlib.sha256(b"\0".join(hashlib.sha256(part).digest() for part in contents)).digest()

    def changed(self, now: float) -> tuple[Authority, bytes] | None:
        """The new issuer and anchors, once the files hold a new consistent set; else None."""
        if not self._poll.due(now):
            return None
        try:
            contents = read_issuer_files(self.directory)
        except OSError as e:
            log.warning("the issuer files in %s cannot be read now (%s): the current issuer stays", self.directory, e)
            return None
        digest = self._digest(contents)
        if digest == self._seen or digest == self._refused:
            return None
        try:
            issuer, anchors = issuer_from_pem(*contents)
            check_chains_to_anchors(issuer, anchors)
        except ValueError as e:
            self._refused = digest
            log.error("the issuer files in %s changed but are not usable (%s): the current issuer stays", self.directory,
                      e)
            return None
        self._seen, self._refused = digest, None
        self.current = issuer, anchors
        return issuer, anchors
