"""Moving release files over HTTP: the one resumable client and the one set of serving rules.

`http` decides status and headers for a file request (ETag, 304, Range, 416)
as a pure function; the dashboard's WSGI app and the gateway's edge server
both use it. `client` is the resumable downloader shared by gateway and robot.
"""
