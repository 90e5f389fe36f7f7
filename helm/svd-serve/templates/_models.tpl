{{/* ---------------------------------------------------------------- model zoo and model cache */}}

{{/*
The PersistentVolumeClaim of the model cache: modelCache.existingClaim, else the chart's own claim
when modelCache.persistence.enabled; empty for an emptyDir per pod.
*/}}
{{- define "svd-serve.modelCacheClaim" -}}
{{- if .Values.modelCache.existingClaim }}
{{- .Values.modelCache.existingClaim }}
{{- else if (dig "persistence" "enabled" false .Values.modelCache) }}
{{- printf "%s-model-cache" (include "svd-serve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The app's `models` (serve.zoo.entry.ModelEntry entries) as YAML; values.schema.json checks each
entry, this checks the list: ids are unique, and a `base` named in the list is an image-to-video
entry (a base outside the list may already be in the registry, so it is left to the application).
*/}}
{{- define "svd-serve.models" -}}
{{- $kinds := dict }}
{{- range $i, $entry := .Values.models }}
{{- if hasKey $kinds $entry.id }}
{{- fail (printf "models[%d]: the id %q is used twice; model ids must be unique" $i $entry.id) }}
{{- end }}
{{- $_ := set $kinds $entry.id (default "image-to-video" $entry.kind) }}
{{- end }}
{{- range $i, $entry := .Values.models }}
{{- with $entry.base }}
{{- if and (hasKey $kinds .) (ne (get $kinds .) "image-to-video") }}
{{- fail (printf "models[%d] (%s): base %q is a %s model; a fine-tune's base must be image-to-video" $i $entry.id . (get $kinds .)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (.Values.models | default list) }}
{{- end }}
