{{/* vim: set filetype=mustache: */}}

{{/* Chart name. */}}
{{- define "svd-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, at most 47 characters: it names the RayService, and KubeRay rejects RayService names
longer than 47 (it appends a 6-character suffix for the RayCluster, whose name plus "-serve-svc"
must fit in 63). A longer name keeps its first 40 characters plus "-" and 6 characters of its
SHA-256, so two long release names do not collide. Every other object name derives from it.
*/}}
{{- define "svd-serve.fullname" -}}
{{- $full := "" }}
{{- if .Values.fullnameOverride }}
{{- $full = .Values.fullnameOverride }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- $full = .Release.Name }}
{{- else }}
{{- $full = printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- end }}
{{- if gt (len $full) 47 }}
{{- printf "%s-%s" ($full | trunc 40 | trimSuffix "-") ($full | sha256sum | trunc 6) }}
{{- else }}
{{- $full }}
{{- end }}
{{- end }}

{{/* The RayService name: the full name, checked against KubeRay's rules (DNS-1035 label, <= 47). */}}
{{- define "svd-serve.rayServiceName" -}}
{{- $name := include "svd-serve.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q must be a DNS-1035 label (start with a letter): set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* The API Service KubeRay creates for the RayService (spec.serveService). */}}
{{- define "svd-serve.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "svd-serve.fullname" .) }}
{{- end }}

{{/* Chart label value. */}}
{{- define "svd-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "svd-serve.labels" -}}
helm.sh/chart: {{ include "svd-serve.chart" . }}
{{ include "svd-serve.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: svd-serve
{{- end }}

{{/* Selector labels. */}}
{{- define "svd-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "svd-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the Ray pods (head and workers, of every RayCluster of the RayService). */}}
{{- define "svd-serve.raySelectorLabels" -}}
{{ include "svd-serve.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{/*
Labels of the Ray pods. Deliberately without the chart or app version: a label change in
rayClusterConfig makes KubeRay roll out a whole new RayCluster (GPU nodes included).
*/}}
{{- define "svd-serve.rayPodLabels" -}}
{{ include "svd-serve.raySelectorLabels" . }}
app.kubernetes.io/part-of: svd-serve
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "svd-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "svd-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Container image of the Ray pods. */}}
{{- define "svd-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* ---------------------------------------------------------------- secrets */}}

{{/* Secret and key of the HF token, as "name/key"; empty when no token is configured. */}}
{{- define "svd-serve.hfTokenSecretName" -}}
{{- if .Values.huggingface.existingSecret }}
{{- .Values.huggingface.existingSecret }}
{{- else if .Values.huggingface.token }}
{{- printf "%s-hf-token" (include "svd-serve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "svd-serve.hfTokenSecretKey" -}}
{{- if .Values.huggingface.existingSecret }}
{{- .Values.huggingface.existingSecretKey }}
{{- else }}
{{- print "HF_TOKEN" }}
{{- end }}
{{- end }}

{{/* Secret with AWS credentials; empty when none is configured. */}}
{{- define "svd-serve.awsSecretName" -}}
{{- if .Values.aws.existingSecret }}
{{- .Values.aws.existingSecret }}
{{- else if or .Values.aws.accessKeyId .Values.aws.secretAccessKey }}
{{- if not (and .Values.aws.accessKeyId .Values.aws.secretAccessKey) }}
{{- fail "aws.accessKeyId and aws.secretAccessKey must be set together" }}
{{- end }}
{{- printf "%s-aws" (include "svd-serve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Secret with the tenants file; empty when tenants are not configured. */}}
{{- define "svd-serve.tenantsSecretName" -}}
{{- if .Values.tenants.existingSecret }}
{{- .Values.tenants.existingSecret }}
{{- else if .Values.tenants.content }}
{{- printf "%s-tenants" (include "svd-serve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Check the inline tenants file: it must parse, and every key_hashes entry must be a SHA-256 hash
("sha256:" + 64 hex digits), so a raw API key pasted by mistake fails the install.
*/}}
{{- define "svd-serve.checkTenants" -}}
{{- if and .Values.tenants.content (not .Values.tenants.existingSecret) }}
{{- $doc := fromYaml .Values.tenants.content }}
{{- if hasKey $doc "Error" }}
{{- fail (printf "tenants.content is not valid YAML/JSON: %s" $doc.Error) }}
{{- end }}
{{- if not (kindIs "map" $doc.tenants) }}
{{- fail "tenants.content must hold a `tenants:` mapping of tenant name to {key_hashes: [...]}" }}
{{- end }}
{{- range $name, $tenant := $doc.tenants }}
{{- range $hash := (get (default dict $tenant) "key_hashes" | default list) }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" (toString $hash)) }}
{{- fail (printf "tenants.content: tenant %q has a key_hashes entry that is not sha256:<64 hex digits>; store only key hashes (see `svd-serve tenants`), never raw keys" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Path of the tenants file in the pods. */}}
{{- define "svd-serve.tenantsFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.tenants.mountPath) .Values.tenants.existingSecretKey }}
{{- end }}

{{/* ---------------------------------------------------------------- redis */}}

{{/* Whether anything uses Redis. */}}
{{- define "svd-serve.redisUsed" -}}
{{- if or .Values.gcsFaultTolerance.enabled (eq .Values.jobStore.backend "redis") }}true{{ end }}
{{- end }}

{{/* host:port of Redis (bundled or external); fails when Redis is needed but not configured. */}}
{{- define "svd-serve.redisAddress" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis:6379" (include "svd-serve.fullname" .) }}
{{- else if .Values.redis.external.address }}
{{- .Values.redis.external.address }}
{{- else }}
{{- fail "Redis is needed (gcsFaultTolerance.enabled or jobStore.backend: redis): set redis.enabled or redis.external.address" }}
{{- end }}
{{- end }}

{{/* Secret holding the Redis password; empty for an external Redis without a password. */}}
{{- define "svd-serve.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if or .Values.redis.enabled .Values.redis.auth.password }}
{{- printf "%s-redis" (include "svd-serve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "svd-serve.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- print "redis-password" }}
{{- end }}
{{- end }}

{{/* The job store's redis_url (no password: that comes from REDIS_PASSWORD). */}}
{{- define "svd-serve.jobStoreRedisUrl" -}}
{{- if .Values.jobStore.redis_url }}
{{- .Values.jobStore.redis_url }}
{{- else }}
{{- $scheme := "redis" }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.tls }}
{{- $scheme = "rediss" }}
{{- end }}
{{- printf "%s://%s/%d" $scheme (include "svd-serve.redisAddress" .) (int .Values.redis.jobStoreDatabase) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- the Serve application */}}

{{/* Path of the model in the pods when tinyModel is enabled. */}}
{{- define "svd-serve.tinyModelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelCache.mountPath) .Values.tinyModel.subPath }}
{{- end }}

{{/* Whether text-to-video is on ("true" or empty); `textToImageModel: null` also turns it off. */}}
{{- define "svd-serve.textToImageEnabled" -}}
{{- if and .Values.textToImageModel .Values.textToImageModel.enabled }}true{{ end }}
{{- end }}

{{/* Path of the tiny text-to-image model in the pods (tinyModel and textToImageModel enabled). */}}
{{- define "svd-serve.tinyTextToImagePath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelCache.mountPath) .Values.tinyModel.textToImageSubPath }}
{{- end }}

{{/*
The application's args: serve.config.AppConfig as a dict. Sections are copied from values (so
their keys are AppConfig's field names); the chart fills in what depends on its own objects:
the model cache directory, the tiny model paths, the Redis URL, the tenants file path and, with
compileCache.enabled, the compile cache of every compiled stage that names none of its own.
With text-to-image disabled its stage is left out (nothing builds it). `models` (the zoo) is
rendered only when it has entries. The RayService's serveConfigV2 and the warm-cache Jobs'
ConfigMap both render it from here, so the Jobs compile exactly what the replicas will.
*/}}
{{- define "svd-serve.appArgs" -}}
{{- $model := deepCopy .Values.model }}
{{- $_ := set $model "cache_dir" .Values.modelCache.mountPath }}
{{- $t2iOn := include "svd-serve.textToImageEnabled" . }}
{{- $t2i := omit (.Values.textToImageModel | default dict) "enabled" | deepCopy }}
{{- $_ := set $t2i "cache_dir" .Values.modelCache.mountPath }}
{{- if .Values.tinyModel.enabled }}
{{- $_ := set $model "source" (include "svd-serve.tinyModelPath" .) }}
{{- $_ := set $t2i "source" (include "svd-serve.tinyTextToImagePath" .) }}
{{- end }}
{{- $stages := dict }}
{{- range $stage, $cfg := .Values.stages }}
{{- if and (eq $stage "text_to_image") (not $t2iOn) }}
{{- continue }}
{{- end }}
{{- if and (hasKey $cfg "num_replicas") (hasKey $cfg "autoscaling") }}
{{- fail (printf "stages.%s: set either num_replicas or autoscaling, not both (set autoscaling: null for a fixed count)" $stage) }}
{{- end }}
{{- include "svd-serve.checkStageOptions" (dict "stage" $stage "cfg" $cfg) }}
{{- $stageCfg := deepCopy $cfg }}
{{- if and $.Values.compileCache.enabled (include "svd-serve.compiles" $stageCfg) (not $stageCfg.acceleration.cache_dir) }}
{{- $_ := set $stageCfg.acceleration "cache_dir" (include "svd-serve.compileCacheLocation" $) }}
{{- end }}
{{- $_ := set $stages $stage $stageCfg }}
{{- end }}
{{- $jobStore := deepCopy .Values.jobStore }}
{{- if eq .Values.jobStore.backend "redis" }}
{{- $_ := set $jobStore "redis_url" (include "svd-serve.jobStoreRedisUrl" .) }}
{{- end }}
{{- $auth := dict }}
{{- if include "svd-serve.tenantsSecretName" . }}
{{- $_ := set $auth "tenants_file" (include "svd-serve.tenantsFile" .) }}
{{- end }}
{{- $args := dict
  "model" $model
  "stages" $stages
  "storage" (deepCopy .Values.storage)
  "job_store" $jobStore
  "tracing" (deepCopy .Values.tracing)
  "auth" $auth
  "max_inflight_jobs" .Values.app.max_inflight_jobs
  "max_upload_bytes" .Values.app.max_upload_bytes
  "url_allowlist" (.Values.app.url_allowlist | default list)
  "webhooks" (deepCopy .Values.app.webhooks)
  "generations_wait_s" .Values.app.generations_wait_s
  "max_duration_s" .Values.app.max_duration_s
  "max_segments" .Values.app.max_segments
  "default_params" (.Values.app.default_params | default dict)
  "text_to_image_model" (ternary $t2i nil (eq $t2iOn "true"))
}}
{{- if .Values.app.public_url }}
{{- $_ := set $args "public_url" .Values.app.public_url }}
{{- end }}
{{- if .Values.app.stage_modules }}
{{- $_ := set $args "stage_modules" .Values.app.stage_modules }}
{{- end }}
{{- with .Values.app.model_id }}
{{- $_ := set $args "model_id" . }}
{{- end }}
{{- if .Values.models }}
{{- $_ := set $args "models" (include "svd-serve.models" . | fromYamlArray) }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
Stage-specific options only where they apply, with the application's message
(serve/config/deployments.py, _check_stage_options): a misplaced option fails the install instead of
the Serve application. A default value is no placement. Call with (dict "stage" name "cfg" options).
*/}}
{{- define "svd-serve.checkStageOptions" -}}
{{- $applies := dict
  "acceleration" (list "image_encoder" "sampler" "decoder")
  "warmup_shapes" (list "image_encoder" "sampler" "decoder")
  "low_vram" (list "sampler" "decoder")
  "h264_codec" (list "video_encoder") }}
{{- range $option, $stages := $applies }}
{{- $value := get ($.cfg | default dict) $option }}
{{- $isDefault := or (kindIs "invalid" $value) (and (kindIs "slice" $value) (eq (len $value) 0)) (and (eq $option "h264_codec") (eq (toString $value) "auto")) }}
{{- if and (hasKey ($.cfg | default dict) $option) (not $isDefault) (not (has $.stage $stages)) }}
{{- fail (printf "stages.%s.%s applies only to %s" $.stage $option (join ", " $stages)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when a stage's options (a values.stages entry) compile: acceleration.compile other than none. */}}
{{- define "svd-serve.compiles" -}}
{{- $acceleration := get (. | default dict) "acceleration" }}
{{- if and (kindIs "map" $acceleration) $acceleration.compile (ne (toString $acceleration.compile) "none") }}true{{ end }}
{{- end }}

{{/* The compile cache's location: compileCache.url, else a directory on the model-cache volume. */}}
{{- define "svd-serve.compileCacheLocation" -}}
{{- if .Values.compileCache.url }}
{{- .Values.compileCache.url }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelCache.mountPath) .Values.compileCache.subPath }}
{{- end }}
{{- end }}

{{/*
The compiled stages by the worker group that hosts them, as YAML ({group: [stage, ...]}). A stage's
host is the first enabled group (by name) that offers every custom resource the stage requests and
at least its GPU share, the rule Ray schedules by. The cache key includes the GPU kind, so each
group's stages are warmed on that group's node kind.
*/}}
{{- define "svd-serve.compiledStageGroups" -}}
{{- $hosted := dict }}
{{- range $stage := list "image_encoder" "sampler" "decoder" }}
{{- $cfg := get $.Values.stages $stage | default dict }}
{{- if include "svd-serve.compiles" $cfg }}
{{- $options := $cfg.ray_actor_options | default dict }}
{{- $host := "" }}
{{- range $name, $group := $.Values.workerGroups }}
{{- if and (not $host) $group.enabled }}
{{- $fits := ge (float64 ($group.gpus | default 0)) (float64 ($options.num_gpus | default 0)) }}
{{- range $resource, $amount := ($options.resources | default dict) }}
{{- $offered := get ($group.rayResources | default dict) $resource }}
{{- if or (kindIs "invalid" $offered) (kindIs "string" $offered) (lt (float64 $offered) (float64 $amount)) }}
{{- $fits = false }}
{{- end }}
{{- end }}
{{- if $fits }}
{{- $host = $name }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $host }}
{{- fail (printf "compileCache.warmJob: no enabled worker group can host stages.%s (custom resources %s, num_gpus %v), so there is no node kind to warm its compile cache on" $stage (toJson ($options.resources | default dict)) ($options.num_gpus | default 0)) }}
{{- end }}
{{- $_ := set $hosted $host (append (get $hosted $host | default list) $stage) }}
{{- end }}
{{- end }}
{{- toYaml $hosted }}
{{- end }}

{{/*
Objects this release creates that the warm-cache Jobs need; comma-separated, empty when none. Helm
creates them after pre-install hooks run, so a pre-install Job would wait for them forever.
*/}}
{{- define "svd-serve.warmJobReleaseObjects" -}}
{{- $objects := list }}
{{- if .Values.serviceAccount.create }}
{{- $objects = append $objects (printf "ServiceAccount %s" (include "svd-serve.serviceAccountName" .)) }}
{{- end }}
{{- if and (include "svd-serve.modelCacheClaim" .) (not .Values.modelCache.existingClaim) }}
{{- $objects = append $objects (printf "PersistentVolumeClaim %s" (include "svd-serve.modelCacheClaim" .)) }}
{{- end }}
{{- if and (include "svd-serve.hfTokenSecretName" .) (not .Values.huggingface.existingSecret) }}
{{- $objects = append $objects (printf "Secret %s" (include "svd-serve.hfTokenSecretName" .)) }}
{{- end }}
{{- if and (include "svd-serve.awsSecretName" .) (not .Values.aws.existingSecret) }}
{{- $objects = append $objects (printf "Secret %s" (include "svd-serve.awsSecretName" .)) }}
{{- end }}
{{- if eq .Values.jobStore.backend "redis" }}
{{- if and (include "svd-serve.redisSecretName" .) (not .Values.redis.auth.existingSecret) }}
{{- $objects = append $objects (printf "Secret %s" (include "svd-serve.redisSecretName" .)) }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- $objects = append $objects (printf "the bundled Redis %s-redis" (include "svd-serve.fullname" .)) }}
{{- end }}
{{- end }}
{{- join ", " $objects }}
{{- end }}

{{/* helm.sh/hook of the warm-cache Jobs: compileCache.warmJob.hooks, pre-install made post-install
when the Jobs need objects of this release (svd-serve.warmJobReleaseObjects). */}}
{{- define "svd-serve.warmJobHooks" -}}
{{- $blocked := include "svd-serve.warmJobReleaseObjects" . }}
{{- $hooks := list }}
{{- range .Values.compileCache.warmJob.hooks }}
{{- $hooks = append $hooks (ternary "post-install" . (and (eq . "pre-install") (ne $blocked ""))) }}
{{- end }}
{{- $hooks | uniq | join "," }}
{{- end }}

{{/* Name of the warm-cache Job of one worker group (<= 63 characters); call with (dict "root" $ "group" name). */}}
{{- define "svd-serve.warmJobName" -}}
{{- $name := printf "%s-warm-cache-%s" (include "svd-serve.fullname" .root) .group }}
{{- if gt (len $name) 63 }}
{{- printf "%s-%s" ($name | trunc 56 | trimSuffix "-") ($name | sha256sum | trunc 6) }}
{{- else }}
{{- $name }}
{{- end }}
{{- end }}

{{/* serveConfigV2: one application, `serve.app:build_app` with the AppConfig args. */}}
{{- define "svd-serve.serveConfig" -}}
{{- $http := dict "host" "0.0.0.0" "port" 8000 "keep_alive_timeout_s" .Values.serve.keepAliveTimeoutS }}
{{- if .Values.serve.requestTimeoutS }}
{{- $_ := set $http "request_timeout_s" .Values.serve.requestTimeoutS }}
{{- end }}
{{- $app := dict
  "name" .Values.serve.applicationName
  "route_prefix" "/"
  "import_path" "serve.app:build_app"
  "args" (include "svd-serve.appArgs" . | fromYaml)
}}
{{- $config := dict
  "proxy_location" .Values.serve.proxyLocation
  "http_options" $http
  "applications" (list $app)
}}
{{- toYaml $config }}
{{- end }}

{{/* ---------------------------------------------------------------- Ray pods */}}

{{/*
Environment of every Ray container, and of the warm-cache Jobs ("job" true: no Serve proxy, no
tenants file). Call with (dict "root" $ "head" true|false ["job" true]).
With GCS fault tolerance KubeRay injects REDIS_PASSWORD into the head itself (from
gcsFaultToleranceOptions.redisPassword, the same Secret) and rejects a head that sets it.
*/}}
{{- define "svd-serve.rayEnv" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" $v.modelCache.mountPath) | quote }}
- name: SVD_SERVE_CACHE_DIR
  value: {{ $v.modelCache.mountPath | quote }}
{{- if not .job }}
# Serve's HTTP proxy answers 503 (not 404) while the application starts (serve/api/startup.py).
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: "serve.api.startup:proxy_middlewares"
{{- end }}
{{- with include "svd-serve.hfTokenSecretName" $root }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "svd-serve.hfTokenSecretKey" $root }}
{{- end }}
{{- with include "svd-serve.awsSecretName" $root }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- if $v.aws.existingSecret }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SESSION_TOKEN
      optional: true
{{- end }}
{{- end }}
{{- with $v.aws.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if and (eq $v.jobStore.backend "redis") (not (and .head $v.gcsFaultTolerance.enabled)) }}
{{- with include "svd-serve.redisSecretName" $root }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "svd-serve.redisSecretKey" $root }}
{{- end }}
{{- end }}
{{- if and (include "svd-serve.tenantsSecretName" $root) (not .head) (not .job) }}
- name: SVD_SERVE_TENANTS_FILE
  value: {{ include "svd-serve.tenantsFile" $root | quote }}
{{- end }}
{{- with $v.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes of every Ray pod; call with (dict "root" $ "shmSizeLimit" ... "head" true|false).
The tenants Secret is mounted on the workers only: the head runs no replica that reads it, and
the Serve driver on the head makes paths absolute with Path.resolve(), which would turn the
Secret's symlink (tenants.yaml -> ..data/tenants.yaml) into a pod-specific, timestamped directory
that the workers do not have and that disappears on every Secret update.
*/}}
{{- define "svd-serve.rayVolumes" -}}
{{- $v := .root.Values }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSizeLimit }}
{{ include "svd-serve.modelCacheVolume" .root }}
- name: data
{{- if $v.dataVolume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.dataVolume.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.dataVolume.sizeLimit }}
{{- end }}
{{- if not .head }}
{{- with include "svd-serve.tenantsSecretName" .root }}
- name: tenants
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $v.tenants.existingSecretKey }}
        path: {{ $v.tenants.existingSecretKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model-cache volume (a claim, else an emptyDir per pod). */}}
{{- define "svd-serve.modelCacheVolume" -}}
- name: model-cache
{{- with include "svd-serve.modelCacheClaim" . }}
  persistentVolumeClaim:
    claimName: {{ . }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- end }}
{{- end }}

{{/* Volume mounts of every Ray container; call with (dict "root" $ "head" true|false). */}}
{{- define "svd-serve.rayVolumeMounts" -}}
{{- $v := .root.Values }}
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ $v.modelCache.mountPath }}
- name: data
  mountPath: {{ $v.dataVolume.mountPath }}
{{- if and (include "svd-serve.tenantsSecretName" .root) (not .head) }}
- name: tenants
  mountPath: {{ $v.tenants.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* initContainers of every Ray pod (the tiny model, when enabled). */}}
{{- define "svd-serve.rayInitContainers" -}}
{{- if .Values.tinyModel.enabled }}
- name: tiny-model
  image: {{ include "svd-serve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - >-
      (test -f {{ include "svd-serve.tinyModelPath" . }}/model_index.json || svd-serve tiny-model {{ include "svd-serve.tinyModelPath" . }})
      {{- if include "svd-serve.textToImageEnabled" . }}
      && (test -f {{ include "svd-serve.tinyTextToImagePath" . }}/model_index.json || svd-serve tiny-model --text-to-image {{ include "svd-serve.tinyTextToImagePath" . }})
      {{- end }}
  env:
    - name: OMP_NUM_THREADS
      value: "1"
  resources:
    {{- toYaml .Values.tinyModel.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model-cache
      mountPath: {{ .Values.modelCache.mountPath }}
{{- end }}
{{- end }}
