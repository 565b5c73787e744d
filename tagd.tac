"""Run tagd with C{twistd -n --pidfile= -y tagd.tac}; the configuration path comes from $TAGD_CONFIG."""

from twisted.application.service import Application

from tagd.daemon.tap import Options, makeService

application = Application("tagd")
makeService(Options()).setServiceParent(application)
