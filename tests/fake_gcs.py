"""An in-memory Google Cloud Storage server on localhost, for tests (no network, no account).

It speaks the part of the GCS JSON API that the real clients of this project use:
TensorStore's `gcs` kvstore (orbax array data), gcsfs (etils.epath's `gs://` backend) and
google-cloud-storage (orbax's bucket look-up). Point them at it with `environ(url)`.

  server = fake_gcs.Server(buckets=('bucket',)); server.start()
  os.environ.update(fake_gcs.environ(server.url))

Objects live in a dict {(bucket, name): _Object}; generations make TensorStore's
conditional writes (ifGenerationMatch) and cached reads (ifGenerationNotMatch) behave.
`python tests/fake_gcs.py PORT_FILE` runs one in its own process (for subprocess tests);
it writes its URL to PORT_FILE and serves until killed.
"""

import base64
import dataclasses
import datetime
import email.parser
import email.policy
import hashlib
import http.server
import json
import re
import sys
import threading
import urllib.parse

try:
  import google_crc32c  # Installed with google-cloud-storage; clients check the hash.
except ImportError:  # pragma: no cover
  google_crc32c = None


def environ(url):
  """Environment variables that send every GCS client of this project to `url`."""
  return {
      # gcsfs and google-cloud-storage.
      'STORAGE_EMULATOR_HOST': url,
      # gcsfs: anonymous credentials (no metadata-server probe).
      'FSSPEC_GCS_TOKEN': 'anon',
      # TensorStore's gcs driver: endpoint, fixed bearer token, HTTP/1.1.
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
      'TENSORSTORE_GCS_HTTP_VERSION': '1.1',
      # google-auth must never look for a GCE metadata server off this machine.
      'NO_GCE_CHECK': 'True',
      'GCE_METADATA_HOST': '127.0.0.1:9',
      'GCE_METADATA_IP': '127.0.0.1:9',
      'GOOGLE_CLOUD_PROJECT': 'fake-project',
      # gcsfs's zonal/HNS detection speaks gRPC to the control plane, which this fake lacks.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


@dataclasses.dataclass
class _Object:
  data: bytes
  generation: int
  content_type: str
  updated: str


def _now():
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def _hashes(data):
  md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
  crc = None
  if google_crc32c is not None:
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, 'big')).decode()
  return md5, crc


class Store:
  """The buckets and their objects (thread-safe)."""

  def __init__(self, buckets=()):
    self.lock = threading.Lock()
    self.buckets = set(buckets)
    self.objects = {}
    self.next_generation = 1000
    self.uploads = {}
    self.requests = []

  def names(self, bucket):
    with self.lock:
      return sorted(n for b, n in self.objects if b == bucket)

  def put(self, bucket, name, data, content_type='application/octet-stream'):
    with self.lock:
      self.next_generation += 1
      obj = _Object(bytes(data), self.next_generation, content_type, _now())
      self.objects[(bucket, name)] = obj
      return obj


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  store: Store = None  # Set per server class.

  def log_message(self, fmt, *args):  # Quiet; requests are recorded in store.requests.
    del fmt, args

  def handle(self):
    try:
      super().handle()
    except (BrokenPipeError, ConnectionResetError):
      pass  # A client that gave up on a response (a cancelled read) is not an error.

  # --- Plumbing ------------------------------------------------------------------------

  def _body(self):
    n = int(self.headers.get('Content-Length') or 0)
    return self.rfile.read(n) if n else b''

  def _send(self, status, body=b'', headers=None, content_type='application/json'):
    if isinstance(body, (dict, list)):
      body = json.dumps(body).encode()
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _error(self, status, message):
    self._send(status, {'error': {'code': status, 'message': message,
                                  'errors': [{'message': message}]}})

  def _meta(self, bucket, name, obj):
    md5, crc = _hashes(obj.data)
    meta = {
        'kind': 'storage#object', 'id': f'{bucket}/{name}/{obj.generation}',
        'selfLink': f'{self._base()}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe="")}',
        'name': name, 'bucket': bucket, 'generation': str(obj.generation),
        'metageneration': '1', 'contentType': obj.content_type,
        'size': str(len(obj.data)), 'md5Hash': md5, 'storageClass': 'STANDARD',
        'timeCreated': obj.updated, 'updated': obj.updated, 'etag': f'"{obj.generation}"',
    }
    if crc:
      meta['crc32c'] = crc
    return meta

  def _base(self):
    return f'http://{self.headers.get("Host")}'

  def _conditions_fail(self, obj, query):
    """412 (or 304 for reads) per ifGeneration(Not)Match; None when the request may go on."""
    gen = obj.generation if obj is not None else 0
    if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != gen:
      return 412
    if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch']) == gen:
      return 304 if self.command == 'GET' else 412
    if 'ifMetagenerationMatch' in query and obj is not None and int(
        query['ifMetagenerationMatch']) != 1:
      return 412
    return None

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    path = url.path
    with self.store.lock:
      self.store.requests.append((self.command, path, query.get('alt', '')))
    return path, query

  # --- Verbs ---------------------------------------------------------------------------

  def do_GET(self):  # pylint: disable=invalid-name
    path, query = self._route()
    m = re.fullmatch(r'/(?:download/)?storage/v1/b/([^/]+)/o/(.+)', path)
    if m:
      return self._get_object(m.group(1), urllib.parse.unquote(m.group(2)), query)
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o/?', path)
    if m:
      return self._list(m.group(1), query)
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/?', path)
    if m:
      bucket = m.group(1)
      if bucket not in self.store.buckets:
        return self._error(404, f'bucket {bucket} not found')
      return self._send(200, {'kind': 'storage#bucket', 'name': bucket, 'id': bucket,
                              'location': 'US', 'storageClass': 'STANDARD',
                              'metageneration': '1', 'timeCreated': _now(),
                              'updated': _now(), 'projectNumber': '0'})
    if re.fullmatch(r'/storage/v1/b/?', path):
      return self._send(200, {'kind': 'storage#buckets', 'items': [
          {'kind': 'storage#bucket', 'name': b, 'id': b} for b in sorted(self.store.buckets)]})
    m = re.fullmatch(r'/upload/storage/v1/b/([^/]+)/o', path)
    if m and query.get('upload_id'):
      return self._error(404, 'no resumable status queries here')
    return self._error(404, f'no route for GET {path}')

  do_HEAD = do_GET  # pylint: disable=invalid-name

  def _get_object(self, bucket, name, query):
    with self.store.lock:
      obj = self.store.objects.get((bucket, name))
    if obj is None:
      return self._error(404, f'No such object: {bucket}/{name}')
    status = self._conditions_fail(obj, query)
    if status == 304:
      return self._send(304, b'', {'x-goog-generation': str(obj.generation)})
    if status:
      return self._error(status, 'precondition failed')
    if query.get('alt') != 'media':
      return self._send(200, self._meta(bucket, name, obj))
    data, status, headers = obj.data, 200, {}
    rng = self.headers.get('Range')
    if rng:
      m = re.fullmatch(r'bytes=(\d*)-(\d*)', rng.strip())
      start, end = m.group(1), m.group(2)
      size = len(data)
      if start == '':  # Suffix range: the last N bytes.
        start, end = max(0, size - int(end)), size - 1
      else:
        start = int(start)
        end = size - 1 if end == '' else min(int(end), size - 1)
      if start >= size and size > 0:
        return self._send(416, b'', {'Content-Range': f'bytes */{size}'})
      headers['Content-Range'] = f'bytes {start}-{end}/{size}'
      data, status = data[start:end + 1], 206
    md5, crc = _hashes(obj.data)
    headers.update({'x-goog-generation': str(obj.generation), 'x-goog-metageneration': '1',
                    'x-goog-stored-content-length': str(len(obj.data)),
                    'ETag': f'"{obj.generation}"'})
    if status == 200:
      headers['x-goog-hash'] = f'md5={md5}' + (f',crc32c={crc}' if crc else '')
    return self._send(status, data, headers, obj.content_type)

  def _list(self, bucket, query):
    if bucket not in self.store.buckets:
      return self._error(404, f'bucket {bucket} not found')
    prefix = query.get('prefix', '')
    delimiter = query.get('delimiter', '')
    start, end = query.get('startOffset', ''), query.get('endOffset', '')
    token = query.get('pageToken', '')
    max_results = int(query.get('maxResults') or 1000)
    with self.store.lock:
      names = sorted(n for b, n in self.store.objects if b == bucket)
      objects = dict(self.store.objects)
    items, prefixes = [], set()
    for n in names:
      if not n.startswith(prefix) or (start and n < start) or (end and n >= end):
        continue
      if token and n <= token:
        continue
      rest = n[len(prefix):]
      if delimiter and delimiter in rest:
        p = prefix + rest[:rest.index(delimiter) + len(delimiter)]
        prefixes.add(p)
        if query.get('includeTrailingDelimiter') == 'true' and n == p:
          items.append(n)
        continue
      items.append(n)
    out = {'kind': 'storage#objects'}
    if len(items) > max_results:
      items = items[:max_results]
      out['nextPageToken'] = items[-1]
    out['items'] = [self._meta(bucket, n, objects[(bucket, n)]) for n in items]
    if prefixes:
      out['prefixes'] = sorted(prefixes)
    return self._send(200, out)

  def do_POST(self):  # pylint: disable=invalid-name
    path, query = self._route()
    m = re.fullmatch(r'/upload/storage/v1/b/([^/]+)/o', path)
    if m:
      return self._upload(m.group(1), query)
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)',
                     path)
    if m:
      src_b, src, verb, dst_b, dst = m.groups()
      src, dst = urllib.parse.unquote(src), urllib.parse.unquote(dst)
      self._body()
      with self.store.lock:
        obj = self.store.objects.get((src_b, src))
      if obj is None:
        return self._error(404, f'No such object: {src_b}/{src}')
      new = self.store.put(dst_b, dst, obj.data, obj.content_type)
      meta = self._meta(dst_b, dst, new)
      if verb == 'copyTo':
        return self._send(200, meta)
      return self._send(200, {'kind': 'storage#rewriteResponse', 'done': True,
                              'objectSize': str(len(obj.data)),
                              'totalBytesRewritten': str(len(obj.data)), 'resource': meta})
    if path == '/batch/storage/v1':
      return self._batch()
    self._body()
    return self._error(404, f'no route for POST {path}')

  def _store_upload(self, bucket, name, data, content_type, query):
    if bucket not in self.store.buckets:
      return self._error(404, f'bucket {bucket} not found')
    with self.store.lock:
      old = self.store.objects.get((bucket, name))
    status = self._conditions_fail(old, query)
    if status:
      return self._error(412, 'precondition failed')
    obj = self.store.put(bucket, name, data, content_type or 'application/octet-stream')
    return self._send(200, self._meta(bucket, name, obj))

  def _upload(self, bucket, query):
    kind = query.get('uploadType', 'media')
    body = self._body()
    if 'upload_id' in query:  # gcsfs POSTs the chunks of a resumable upload.
      return self._chunk(query, body)
    if kind == 'media':
      return self._store_upload(bucket, query['name'], body,
                                self.headers.get('Content-Type'), query)
    if kind == 'multipart':
      msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
          b'Content-Type: ' + self.headers['Content-Type'].encode() + b'\r\n\r\n' + body)
      parts = list(msg.iter_parts())
      meta = json.loads(parts[0].get_content())
      data = parts[1].get_payload(decode=True)
      return self._store_upload(bucket, meta.get('name') or query['name'], data,
                                meta.get('contentType') or parts[1].get_content_type(),
                                query)
    if kind == 'resumable':
      meta = json.loads(body or b'{}')
      name = meta.get('name') or query.get('name')
      with self.store.lock:
        upload_id = str(len(self.store.uploads) + 1)
        self.store.uploads[upload_id] = {'bucket': bucket, 'name': name, 'data': b'',
                                         'query': query,
                                         'content_type': meta.get('contentType')}
      location = (f'{self._base()}/upload/storage/v1/b/{bucket}/o?uploadType=resumable'
                  f'&upload_id={upload_id}')
      return self._send(200, b'', {'Location': location})
    return self._error(400, f'uploadType={kind} not supported')

  def do_PUT(self):  # pylint: disable=invalid-name
    _, query = self._route()
    return self._chunk(query, self._body())

  def _chunk(self, query, body):
    upload = self.store.uploads.get(query.get('upload_id', ''))
    if upload is None:
      return self._error(404, 'no such resumable upload')
    upload['data'] += body
    rng = self.headers.get('Content-Range', '')
    m = re.fullmatch(r'bytes (\S+)/(\d+|\*)', rng.strip())
    total = m.group(2) if m else str(len(upload['data']))
    if total != '*' and len(upload['data']) >= int(total):
      del self.store.uploads[query['upload_id']]
      return self._store_upload(upload['bucket'], upload['name'], upload['data'],
                                upload['content_type'], upload['query'])
    headers = {'Range': f'bytes=0-{len(upload["data"]) - 1}'} if upload['data'] else {}
    return self._send(308, b'', headers)

  def _delete(self, bucket, name, query):
    with self.store.lock:
      obj = self.store.objects.get((bucket, name))
      status = self._conditions_fail(obj, query) if obj is not None else None
      if obj is None:
        return 404
      if status:
        return 412
      del self.store.objects[(bucket, name)]
    return 204

  def do_DELETE(self):  # pylint: disable=invalid-name
    path, query = self._route()
    self._body()
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o/(.+)', path)
    if not m:
      return self._error(404, f'no route for DELETE {path}')
    status = self._delete(m.group(1), urllib.parse.unquote(m.group(2)), query)
    if status == 204:
      return self._send(204, b'')
    return self._error(status, 'delete failed')

  def _batch(self):
    """multipart/mixed batch of DELETEs (gcsfs removes several files this way)."""
    body = self._body()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b'Content-Type: ' + self.headers['Content-Type'].encode() + b'\r\n\r\n' + body)
    boundary = 'batch_fake_gcs'
    out = []
    for i, part in enumerate(msg.iter_parts()):
      payload = part.get_payload(decode=True) or part.get_content().encode()
      request_line = payload.decode().split('\r\n', 1)[0].split('\n', 1)[0]
      verb, target = request_line.split()[:2]
      url = urllib.parse.urlsplit(target)
      query = dict(urllib.parse.parse_qsl(url.query))
      m = re.search(r'/storage/v1/b/([^/]+)/o/(.+)', url.path)
      status = 400
      if verb == 'DELETE' and m:
        status = self._delete(m.group(1), urllib.parse.unquote(m.group(2)), query)
      reason = {204: 'No Content', 404: 'Not Found', 412: 'Precondition Failed'}.get(
          status, 'Bad Request')
      inner = f'HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n'
      content_id = part.get('Content-ID', f'<{i}>').strip('<>')
      out.append(f'--{boundary}\r\nContent-Type: application/http\r\n'
                 f'Content-ID: <response-{content_id}>\r\n\r\n{inner}\r\n')
    text = ''.join(out) + f'--{boundary}--\r\n'
    return self._send(200, text.encode(), content_type=f'multipart/mixed; boundary={boundary}')


class Server:
  """A threaded fake GCS on 127.0.0.1 (port 0: any free port)."""

  def __init__(self, buckets=('bucket',), port=0):
    self.store = Store(buckets)
    handler = type('Handler', (_Handler,), {'store': self.store})
    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', port), handler)
    self.httpd.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    self._thread = None

  def start(self):
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


if __name__ == '__main__':
  server = Server(buckets=sys.argv[2:] or ('bucket',))
  with open(sys.argv[1], 'w') as f:
    f.write(server.url)
  server.httpd.serve_forever()
