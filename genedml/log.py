"""The one logger of the package: every module logs through `genedml.log.log` (name "genedml")."""

import logging

LOGGER_NAME = "genedml"
log = logging.getLogger(LOGGER_NAME)
