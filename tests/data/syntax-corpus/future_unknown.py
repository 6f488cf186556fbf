from __future__ import magic
