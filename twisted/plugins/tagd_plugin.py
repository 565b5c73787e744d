"""Register tagd with twistd.  Nothing of tagd is imported while plugins are scanned."""

from twisted.application.service import ServiceMaker

tagd = ServiceMaker("tagd", "tagd.daemon.tap", "Server-side tagging reverse proxy.", "tagd")
